//! Hot reload: the live policy behind an atomic swap, the result of the last reload, and a
//! polling directory watcher.
//!
//! A reload parses and compiles every file; on any error the old policy keeps serving and the
//! errors are recorded. Runtime state (counters always, limiters when the app's limits did not
//! change) is carried over by app name, so a reload does not reset accounting or hand every
//! client a fresh burst.

use crate::accounting::{AppCounters, CountersSnapshot};
use crate::diff::{diff, summarize, Change};
use crate::error::PolicyError;
use crate::eval::Timestamp;
use crate::limits::AppLimits;
use crate::model::App;
use crate::policy::CompiledPolicy;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Runtime state of one app.
#[derive(Debug)]
pub struct AppState {
    pub counters: Arc<AppCounters>,
    pub limits: Arc<AppLimits>,
    pub names: Arc<AppNames>,
}

/// An app's names as each of its requests needs them (in its log line, as the key of pooled
/// upstream connections): shared, so a request clones one `Arc` instead of three strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppNames {
    pub app: String,
    pub device: String,
    pub service: String,
}

/// A compiled policy with the runtime state of each of its apps.
#[derive(Debug)]
pub struct Active {
    pub policy: CompiledPolicy,
    /// Indexed by [`App::index`].
    states: Vec<AppState>,
}

impl Active {
    /// Builds state for `policy`, reusing what `previous` had: an app at the exact place
    /// (listener and target) of one previous app, the only one at it on both sides, takes
    /// that app's state whatever the names (renamed); any other takes the state of the
    /// previous app of its name, unless a renamed one took it. A renamed app keeps its
    /// limiters — its open connections stay counted, its clients get no fresh burst — and its
    /// counters, which its open connections go on counting into. Place first: renamed while
    /// its old name went to a new app elsewhere (`ssh` to `ssh-home1`, a new `ssh` on another
    /// port), the old `ssh`'s connection count went to the new `ssh` and refused its clients
    /// for as long as the old sessions lasted.
    pub fn new(policy: CompiledPolicy, previous: Option<&Active>) -> Self {
        let same_place = |a: &App, b: &App| a.listener == b.listener && a.target == b.target;
        // New app index → previous app index, one to one only: mesh apps share
        // `Listener::Mesh`, and several may lead to one target; two apps sharing one app's
        // limiters would set each other's.
        let mut by_place = std::collections::HashMap::new();
        if let Some(p) = previous {
            for o in p.policy.apps() {
                let mut news = policy.apps().iter().filter(|n| same_place(n, o));
                let olds = p.policy.apps().iter().filter(|x| same_place(x, o)).count();
                if let (Some(n), None, 1) = (news.next(), news.next(), olds) {
                    by_place.insert(n.index, o.index);
                }
            }
        }
        let claimed: std::collections::HashSet<usize> = by_place.values().copied().collect();
        let states = policy
            .apps()
            .iter()
            .map(|app| {
                let old = previous.and_then(|p| {
                    let index = match by_place.get(&app.index) {
                        Some(&o) => o,
                        None => p
                            .policy
                            .app(&app.name)
                            .map(|o| o.index)
                            .filter(|o| !claimed.contains(o))?,
                    };
                    Some(&p.states[index])
                });
                let counters = old.map_or_else(Default::default, |o| o.counters.clone());
                let limits = match old {
                    Some(o) if o.limits.config == app.limits => o.limits.clone(),
                    Some(o) => Arc::new(AppLimits::reloaded(&app.limits, &o.limits)),
                    None => Arc::new(AppLimits::new(&app.limits)),
                };
                let names = Arc::new(AppNames {
                    app: app.name.clone(),
                    device: app.target.device.clone(),
                    service: app.target.service.clone(),
                });
                AppState {
                    counters,
                    limits,
                    names,
                }
            })
            .collect();
        Active { policy, states }
    }

    /// Decides again a request or connection that went to `target` (through `app` now, if any
    /// app serves its route or address still): `Err` says why it is no longer allowed, and a
    /// denial is counted as the app's refusal. A renamed app, or another in its place with
    /// the same target, still allows what it allows.
    pub fn decide_again(
        &self,
        app: Option<&App>,
        target: &crate::Target,
        who: &crate::Requester<'_>,
        method: Option<&str>,
        path: Option<&str>,
    ) -> Result<(), String> {
        match app {
            Some(app) if app.target == *target => {
                match self.policy.decide(app, who, method, path, Timestamp::now()) {
                    crate::Decision::Allow { .. } => Ok(()),
                    crate::Decision::Deny { reason } => Err(self.refused(app, reason)),
                }
            }
            Some(app) => Err(format!("app {} now leads to {}", app.name, app.target)),
            None => Err("no app serves it any more".into()),
        }
    }

    /// Counts a denial by `app` and says it, for a log line.
    fn refused(&self, app: &App, reason: crate::DenyReason) -> String {
        self.state(app)
            .counters
            .refused(crate::accounting::Refusal::Denied(reason));
        format!("app {}: {reason}", app.name)
    }

    /// State of an app of this policy (`app` must come from `self.policy`).
    pub fn state(&self, app: &App) -> &AppState {
        &self.states[app.index]
    }

    /// Counters of every app, by name, for `/status` and `/metrics`.
    pub fn snapshot(&self) -> Vec<(String, CountersSnapshot)> {
        self.policy
            .apps()
            .iter()
            .map(|a| (a.name.clone(), self.states[a.index].counters.snapshot()))
            .collect()
    }

    /// Housekeeping for every app's limiters.
    pub fn maintain(&self) {
        for s in &self.states {
            s.limits.maintain();
        }
    }
}

/// The outcome of the last load or reload, as shown in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadStatus {
    pub ok: bool,
    /// Unix seconds.
    pub at: i64,
    /// Files read by the attempt.
    pub files: usize,
    /// Apps of the policy now serving.
    pub apps: usize,
    /// `path:line:col: message` of each error (empty when ok).
    pub errors: Vec<String>,
    /// Changes applied (`+added ~changed -removed`), empty when refused.
    pub changes: Vec<String>,
}

/// The live policy of a gateway.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<Active>,
    last: Mutex<ReloadStatus>,
    /// The directory as it was just before the serving policy (or the last refused one) was
    /// read: the watcher's starting point, so an edit made while the gateway starts is seen.
    read_at: Mutex<Fingerprint>,
    /// Bumped on every swap, and each minute while a time window is in force: what open
    /// connections wait on to be decided again ([`PolicyStore::until_refused`]).
    epoch: tokio::sync::watch::Sender<u64>,
    /// What the gateway checks of a reloaded policy before it serves ([`PolicyStore::set_check`]).
    check: Mutex<Option<ReloadCheck>>,
    /// Where each policy that serves is copied ([`crate::accepted`]); None: nowhere.
    accepted: Option<PathBuf>,
    /// The files of the policy serving now, as read (for the copy).
    accepted_sources: Mutex<Option<crate::Sources>>,
    /// What the status says while the accepted copy serves (a start found the directory as
    /// it was refused), until a reload takes the directory.
    copy_note: Mutex<Option<String>>,
    /// An edit refused by the gateway's own check alone (an address another program holds):
    /// when it is read again, and the wait after that. Freeing the address changes no file,
    /// and the edit (and every other change in it) stayed unapplied until one was touched.
    check_retry: Mutex<Option<(tokio::time::Instant, Duration)>>,
}

/// The first wait before an edit refused by the gateway's check is read again; each refusal
/// doubles it, up to [`CHECK_RETRY_MAX`].
pub const CHECK_RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between two reads of an edit the gateway's check refused.
pub const CHECK_RETRY_MAX: Duration = Duration::from_secs(300);

/// A check of a compiled policy that only its user can make (a gateway: can it listen on the
/// new addresses?): `Err` holds one message per problem.
#[derive(Clone)]
pub struct ReloadCheck(pub Arc<CheckFn>);

/// The function of a [`ReloadCheck`]: given the new policy and the one serving now.
pub type CheckFn =
    dyn Fn(&CompiledPolicy, &CompiledPolicy) -> Result<(), CheckRefusal> + Send + Sync;

/// Why a [`ReloadCheck`] refused a policy: one message per problem, and whether the same
/// policy may pass later unchanged (an address another program holds now), so that it is
/// worth reading again without an edit (an app on the gateway's own port never passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRefusal {
    pub errors: Vec<CheckError>,
    pub may_pass_later: bool,
}

/// One problem a [`ReloadCheck`] found, and the app it is about: the reload's error then
/// names the app's file and line, as a policy file's own errors do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    pub app: Option<String>,
    pub message: String,
}

impl From<String> for CheckError {
    fn from(message: String) -> Self {
        CheckError { app: None, message }
    }
}

impl std::fmt::Debug for ReloadCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadCheck")
    }
}

/// Reads of the directory at start while refused reads keep finding it changed.
const START_READS: usize = 4;
/// The wait between them.
const START_SETTLE: Duration = Duration::from_millis(500);

/// The last accepted policy's copy, compiled, as a start serves it.
struct ServedCopy<'a> {
    path: &'a Path,
    sources: crate::Sources,
    /// When it was saved, as told.
    saved: String,
    policy: CompiledPolicy,
}

impl PolicyStore {
    /// Loads `dir`; a bad policy is an error (nothing falls back).
    pub fn load(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let read_at = fingerprint(dir);
        let (raw, read_errs) = crate::read_dir_sources(dir).map_err(|e| vec![e])?;
        let (policy, sources) = crate::check_read(raw, read_errs)?;
        let store = Self::serving(dir, policy, fresh_status(), read_at, None);
        // What a file cut short is compared with ([`emptied`]).
        store.set_serving_files(sources);
        Ok(store)
    }

    /// Loads `dir` as a gateway starts. When the directory holds exactly the edit a running
    /// gateway last refused (kept in [`crate::accepted`]'s copy), the policy that served then
    /// serves again and that edit's errors are logged and reported in the status: a refused
    /// edit left in place must not keep the gateway from starting after a reboot. So too when a
    /// file the copy's apps came from is blank now and they are in no other (an editor's save
    /// cut short by a crash), as a reload refuses it. Otherwise
    /// the directory is loaded as [`PolicyStore::load`] does, its errors returned; once the
    /// gateway has started on it, [`PolicyStore::started`] keeps it as the accepted copy.
    pub fn load_keeping_accepted(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        // A start racing a write of the directory (a `git pull`, a config tool, an editor
        // between truncating and writing): a refused read is tried again while the files
        // keep changing, a few times — refused here is an exit the service manager does not
        // restart. A clean read is taken at once.
        let mut attempt = 1;
        loop {
            let before = fingerprint(dir);
            let loaded = Self::load_keeping_accepted_once(dir);
            if loaded.is_ok() || attempt == START_READS {
                return loaded;
            }
            std::thread::sleep(START_SETTLE);
            if fingerprint(dir) == before {
                return loaded;
            }
            tracing::info!(dir = %dir.display(), "policy files refused at start changed meanwhile: reading them again");
            attempt += 1;
        }
    }

    fn load_keeping_accepted_once(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let accepted = crate::accepted::path_for(dir);
        if accepted.is_none() {
            tracing::warn!(dir = %dir.display(), "no place beside the policy directory for a copy of the accepted policy: a start while it holds a refused edit will fail");
        }
        let read_at = fingerprint(dir);
        let (raw, read_errs) = crate::read_dir_sources(dir).map_err(|e| vec![e])?;
        let copy = accepted.as_ref().filter(|p| p.exists()).and_then(|p| {
            let seen = crate::accepted::Seen {
                readable: &raw,
                unreadable: &crate::accepted::names_of(&read_errs),
            };
            match crate::accepted::load(p, dir, &seen) {
                Ok(c) => Some((p, c)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the last accepted policy's copy");
                    None
                }
            }
        });
        // The copy, compiled, when no refused edit is recorded: an emptied file is looked for
        // against it below, once the directory compiled.
        let mut last_accepted = None;
        if let Some((path, copy)) = copy {
            match (crate::check_sources(&copy.sources), copy.refused_now) {
                (Ok(policy), Some((refused_at, errors))) => {
                    let (saved, refused) = (
                        crate::accepted::when(copy.saved_at),
                        crate::accepted::when(refused_at),
                    );
                    for e in &errors {
                        tracing::error!(error = %e, refused = %refused, "the policy directory holds an edit the gateway refused");
                    }
                    let note = format!(
                        "the directory holds the edit refused at {refused}: serving the last accepted policy ({}, saved {saved}) until it is fixed",
                        path.display()
                    );
                    let copy = ServedCopy {
                        path,
                        sources: copy.sources,
                        saved,
                        policy,
                    };
                    return Ok(Self::serving_copy(
                        dir,
                        copy,
                        errors,
                        note,
                        accepted.clone(),
                    ));
                }
                (Ok(policy), None) => {
                    last_accepted = Some(ServedCopy {
                        path,
                        sources: copy.sources,
                        saved: crate::accepted::when(copy.saved_at),
                        policy,
                    })
                }
                (Err(more), Some(_)) => {
                    tracing::warn!(copy = %path.display(), errors = more.len(), "the last accepted policy's copy does not compile: the directory is loaded as it is");
                }
                // Replaced by the directory's policy once the gateway starts on it.
                (Err(_), None) => {}
            }
        }
        let (policy, sources) = crate::check_read(raw, read_errs)?;
        // A file emptied while the gateway was down (a crash between an editor's truncate and
        // its write) is refused as a reload refuses it: its apps would not serve, and the
        // start would then replace the copy, the only place their text is left. Not a
        // directory without policy files (a reload refuses that too): at a start it is likelier
        // the owner taking every app offline, and serving apps they deleted is the worse
        // mistake.
        if let Some(copy) = last_accepted.filter(|_| !sources.is_empty()) {
            let gone = emptied(&copy.policy, &policy, &sources, Some(&copy.sources), dir);
            if !gone.is_empty() {
                let errors: Vec<String> = gone.iter().map(ToString::to_string).collect();
                for e in &errors {
                    tracing::error!(error = %e, "a policy file is empty or cut short where the last accepted policy had apps");
                }
                let note = format!(
                    "serving the last accepted policy ({}, saved {}) until the emptied or cut files are written again, or deleted to drop their apps",
                    copy.path.display(),
                    copy.saved
                );
                return Ok(Self::serving_copy(
                    dir,
                    copy,
                    errors,
                    note,
                    accepted.clone(),
                ));
            }
        }
        // An empty file with no copy to compare with (a first start, or the copy lost): said,
        // as `policy check` refuses it — it may be a save cut short whose apps are gone.
        for (path, _) in sources.iter().filter(|(_, t)| t.trim().is_empty()) {
            tracing::warn!(file = %path.display(), "a policy file is empty: it serves no apps (a save or copy in progress when the gateway stopped? Write it again, or delete it)");
        }
        let store = Self::serving(dir, policy, fresh_status(), read_at, accepted);
        store.set_serving_files(sources);
        Ok(store)
    }

    /// A store serving the last accepted policy's copy at a start, the directory's `errors`
    /// and `note` (what serves, until when) in its status.
    fn serving_copy(
        dir: &Path,
        copy: ServedCopy<'_>,
        errors: Vec<String>,
        note: String,
        accepted: Option<PathBuf>,
    ) -> Self {
        tracing::error!(dir = %dir.display(), copy = %copy.path.display(), saved = %copy.saved, apps = copy.policy.apps().len(), "serving the last accepted policy until the directory is fixed");
        let mut status = fresh_status();
        status.ok = false;
        status.errors = errors;
        status.errors.push(note.clone());
        // Read again by the watcher once it runs (under the gateway's own check): a refusal
        // that no longer applies (an address free again, a newer zonegate) must not keep the
        // old policy for good.
        let retry: Fingerprint = Err("serving the accepted copy".into());
        let store = Self::serving(dir, copy.policy, status, retry, accepted);
        store.set_serving_files(copy.sources);
        *store.copy_note.lock().unwrap_or_else(|e| e.into_inner()) = Some(note);
        store
    }

    /// Records the files of the policy now serving (what the copy is written from).
    fn set_serving_files(&self, files: crate::Sources) {
        *self
            .accepted_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(files);
    }

    /// The gateway started on this store's policy: it becomes the accepted copy (not before:
    /// a policy the gateway cannot start on must not replace the one that served). Does
    /// nothing while the copy itself serves (the directory's refused edit stays recorded).
    pub fn started(&self) {
        if !self.last_reload().ok {
            return;
        }
        let sources = self
            .accepted_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(path), Some(sources)) = (&self.accepted, sources) {
            keep_accepted(path, &sources);
        }
    }

    /// A store serving `policy`, its status `status` with what the policy holds filled in.
    fn serving(
        dir: &Path,
        policy: CompiledPolicy,
        status: ReloadStatus,
        read_at: Fingerprint,
        accepted: Option<PathBuf>,
    ) -> Self {
        let status = ReloadStatus {
            files: policy.files().len(),
            apps: policy.apps().len(),
            changes: policy
                .apps()
                .iter()
                .map(|a| format!("+{}", a.name))
                .collect(),
            ..status
        };
        PolicyStore {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(Active::new(policy, None)),
            last: Mutex::new(status),
            read_at: Mutex::new(read_at),
            epoch: tokio::sync::watch::Sender::new(0),
            check: Mutex::new(None),
            accepted,
            accepted_sources: Mutex::new(None),
            copy_note: Mutex::new(None),
            check_retry: Mutex::new(None),
        }
    }

    /// Makes every reload pass `check` too before its policy serves: one it refuses is
    /// refused like a policy with errors (the old one keeps serving), its messages in the
    /// reload status.
    pub fn set_check(&self, check: ReloadCheck) {
        *self.check.lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    /// Tells open connections to be decided again: the policy changed, or the clock moved
    /// into another minute under a policy with time windows.
    pub fn tick(&self) {
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// [`PolicyStore::until_refused`] for a mesh stream from `from` (holding `roles`) to
    /// `to_device/to_service`: ends when no mesh app allows it any more.
    pub async fn until_mesh_refused(
        &self,
        from: &str,
        roles: &[&str],
        to_device: &str,
        to_service: &str,
    ) -> String {
        self.until_refused(|a| {
            let d = a
                .policy
                .decide_mesh(from, roles, to_device, to_service, Timestamp::now());
            match (d.app, d.decision) {
                (_, crate::Decision::Allow { .. }) => Ok(()),
                (Some(app), crate::Decision::Deny { reason }) => Err(a.refused(app, reason)),
                (None, crate::Decision::Deny { reason }) => Err(reason.to_string()),
            }
        })
        .await
    }

    /// A receiver that sees every [`tick`](PolicyStore::tick): for a loop that decides many
    /// flows again at once rather than one [`until_refused`](PolicyStore::until_refused) each.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Waits until `allowed` refuses under a later policy or minute (each [`tick`]), and
    /// returns its reason. For a connection decided once when it opened: run beside it, and
    /// end it when this returns. Never returns while `allowed` holds.
    ///
    /// [`tick`]: PolicyStore::tick
    pub async fn until_refused<F>(&self, mut allowed: F) -> String
    where
        F: FnMut(&Active) -> Result<(), String>,
    {
        let mut changes = self.epoch.subscribe();
        // A swap between the caller's decision and this subscription would go unseen: decide
        // once more at once.
        changes.mark_changed();
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(why) = allowed(&self.current()) {
                return why;
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy serving now. Cheap (an atomic load and a reference count); hold it for the
    /// duration of one request or connection setup.
    pub fn current(&self) -> Arc<Active> {
        self.current.load_full()
    }

    pub fn last_reload(&self) -> ReloadStatus {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the directory. On success swaps the new policy in and returns the changes; on
    /// any error keeps the old one and returns every error. Both are recorded and logged.
    pub fn reload(&self) -> Result<Vec<Change>, Vec<PolicyError>> {
        self.reload_as(false)
    }

    /// [`PolicyStore::reload`]; `retry`: the directory did not change since an edit the
    /// gateway's check refused, and it is read again to see whether it passes now.
    fn reload_as(&self, retry: bool) -> Result<Vec<Change>, Vec<PolicyError>> {
        // Taken before reading: an edit that lands during the read shows as a change later.
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint(&self.dir);
        let files = crate::policy_files(&self.dir).map(|f| f.len()).unwrap_or(0);
        let at = Timestamp::from(SystemTime::now()).0;
        let check = self.check.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut may_pass_later = false;
        // What was read is kept apart: a refused edit is recorded as read.
        let read = crate::read_dir_sources(&self.dir);
        // The directory as read, files that could not be read by name; None when it could
        // not even be listed (nothing to recognise it by at a start).
        let seen = read
            .as_ref()
            .ok()
            .map(|(r, errs)| (r.clone(), crate::accepted::names_of(errs)));
        let checked = read
            .map_err(|e| vec![e])
            .and_then(|(sources, errs)| crate::check_read(sources, errs))
            .and_then(|(policy, sources)| {
                let before = self
                    .accepted_sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match emptied(
                    &self.current.load().policy,
                    &policy,
                    &sources,
                    before.as_deref(),
                    &self.dir,
                ) {
                    errs if errs.is_empty() => Ok((policy, sources)),
                    errs => Err(errs),
                }
            })
            .and_then(|(policy, sources)| match &check {
                Some(ReloadCheck(f)) => match f(&policy, &self.current.load().policy) {
                    Ok(()) => Ok((policy, sources)),
                    Err(refusal) => {
                        may_pass_later = refusal.may_pass_later;
                        Err(refusal
                            .errors
                            .into_iter()
                            .map(|e| match e.app.as_deref().and_then(|a| policy.app(a)) {
                                // Where the app is written, as a file's own errors are told.
                                Some(app) => PolicyError {
                                    path: app.source.path.clone(),
                                    position: Some(app.source.position),
                                    message: e.message,
                                    unreadable: false,
                                },
                                None => PolicyError::whole(&self.dir, e.message),
                            })
                            .collect())
                    }
                },
                None => Ok((policy, sources)),
            });
        match checked {
            // Saved again while being read: what was read may be half of one save. The watcher
            // sees the change and reads the files again once they settle.
            _ if fingerprint(&self.dir)
                != *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) =>
            {
                tracing::debug!(dir = %self.dir.display(), "policy files changed while being read; reading them again once they settle");
                Ok(Vec::new())
            }
            Ok((policy, sources)) => {
                *self.check_retry.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Some(path) = &self.accepted {
                    keep_accepted(path, &sources);
                }
                self.set_serving_files(sources);
                *self.copy_note.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let old = self.current.load_full();
                let changes = diff(&old.policy, &policy);
                let apps = policy.apps().len();
                self.current
                    .store(Arc::new(Active::new(policy, Some(&old))));
                self.tick();
                tracing::info!(dir = %self.dir.display(), files, apps, changes = %summarize(&changes), "policy reloaded");
                self.set_status(ReloadStatus {
                    ok: true,
                    at,
                    files,
                    apps,
                    errors: Vec::new(),
                    changes: changes.iter().map(|c| c.to_string()).collect(),
                });
                Ok(changes)
            }
            Err(errs) => {
                for e in &errs {
                    if retry {
                        // Said when the edit was first refused; /status keeps saying it.
                        tracing::debug!(error = %e, "policy reload refused again");
                    } else {
                        tracing::warn!(error = %e, "policy reload refused; previous policy keeps serving");
                    }
                }
                let retry_note = {
                    let mut r = self.check_retry.lock().unwrap_or_else(|e| e.into_inner());
                    // A new edit starts from the first wait; the same one waits longer each time.
                    let last = if retry { r.map(|(_, w)| w) } else { None };
                    *r = may_pass_later.then(|| {
                        let wait = last.map_or(CHECK_RETRY_FIRST, |w| (w * 2).min(CHECK_RETRY_MAX));
                        (tokio::time::Instant::now() + wait, wait)
                    });
                    r.map(|(_, wait)| {
                        format!("the gateway reads this edit again in {} s, and when a policy file changes", wait.as_secs())
                    })
                };
                // Recorded beside the copy: a start that finds the directory still like this
                // serves the copy instead of refusing to start.
                let serving = self
                    .accepted_sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let (Some(path), Some(serving), Some((raw, unreadable))) =
                    (&self.accepted, serving, &seen)
                {
                    let texts: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                    let refused = crate::accepted::Seen {
                        readable: raw,
                        unreadable,
                    };
                    if let Err(e) =
                        crate::accepted::note_refused(path, &serving, &refused, &texts, at)
                    {
                        tracing::warn!(copy = %path.display(), error = %e, "cannot record the refused edit beside the accepted policy; a start while the directory holds it will fail");
                    }
                }
                self.set_status(ReloadStatus {
                    ok: false,
                    at,
                    files,
                    apps: self.current.load().policy.apps().len(),
                    errors: errs
                        .iter()
                        .map(|e| e.to_string())
                        .chain(
                            self.copy_note
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .clone(),
                        )
                        .chain(retry_note)
                        .collect(),
                    changes: Vec::new(),
                });
                Err(errs)
            }
        }
    }

    /// Whether an edit the gateway's check refused is due to be read again.
    fn check_retry_due(&self) -> bool {
        self.check_retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|(at, _)| tokio::time::Instant::now() >= at)
    }

    fn set_status(&self, s: ReloadStatus) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// A load's status before [`PolicyStore::serving`] fills in what serves.
fn fresh_status() -> ReloadStatus {
    ReloadStatus {
        ok: true,
        at: Timestamp::now().0,
        files: 0,
        apps: 0,
        errors: Vec::new(),
        changes: Vec::new(),
    }
}

/// Refusals for an edit that empties what serves: a policy file whose apps serve that is
/// blank now, those apps gone from the edit (moved to another file, they are not), or a
/// directory whose files' apps serve that has no policy file left. Both are
/// the shapes of a save or a copy in progress that held still for a moment (an editor that
/// truncates before it writes, `rm -r` then `cp`), and as policies they drop every app they
/// held — listeners closed, connections cut, limiters reset, and the empty policy kept as the
/// copy a restart serves. Removing apps on purpose has its own ways: delete the file, or leave
/// a comment in it.
///
/// Also refused: a file cut short — its text a part of the start of the text that served, not
/// ending at a line's end, its apps dropped (an editor's save or a copy stopped part way
/// through the comments that open every example file would read as "leave only a comment").
/// `before`: the files of the policy that serves, when known.
fn emptied(
    serving: &CompiledPolicy,
    edit: &CompiledPolicy,
    now: &[(PathBuf, String)],
    before: Option<&[(PathBuf, String)]>,
    dir: &Path,
) -> Vec<PolicyError> {
    let apps_of = |path: &Path| -> Vec<&str> {
        serving
            .apps()
            .iter()
            .filter(|a| a.source.path == path && edit.app(&a.name).is_none())
            .map(|a| a.name.as_str())
            .collect()
    };
    if now.is_empty() && !serving.apps().is_empty() {
        return vec![PolicyError::whole(
            dir,
            format!(
                "holds no policy files now, where {} apps served: a copy in progress? The policy that serves stays; to serve no apps at all, leave one file holding only a comment",
                serving.apps().len()
            ),
        )];
    }
    let cut_short = |path: &Path, text: &str| -> Option<usize> {
        let (_, was) = before?.iter().find(|(p, _)| p == path)?;
        (!text.ends_with('\n') && was.len() > text.len() && was.starts_with(text))
            .then_some(was.len())
    };
    now.iter()
        .filter_map(|(path, text)| {
            let apps = apps_of(path);
            if apps.is_empty() {
                return None;
            }
            let why = if text.trim().is_empty() {
                format!(
                    "is empty now, and its apps are in no other file ({}): a save or copy in progress? The policy that serves stays; to drop them, delete the file or leave only a comment in it",
                    apps.join(", ")
                )
            } else if let Some(was) = cut_short(path, text) {
                format!(
                    "ends mid-line after {} of the {was} bytes it held, its apps gone ({}): a save or copy cut short? The policy that serves stays; write the file again whole (to drop the apps, delete it, or save it with a comment ending in a new line)",
                    text.len(),
                    apps.join(", ")
                )
            } else {
                return None;
            };
            Some(PolicyError::whole(path, why))
        })
        .collect()
}

/// Copies the files of a policy that now serves; a copy that cannot be written is logged
/// (the policy serves anyway; only a later start with a bad directory misses it).
fn keep_accepted(path: &Path, sources: &[(PathBuf, String)]) {
    if let Err(e) = crate::accepted::save(path, sources, Timestamp::now().0) {
        tracing::warn!(copy = %path.display(), error = %e, "cannot keep a copy of the accepted policy; a start while the directory holds errors will fail");
    }
}

/// What the watcher compares between polls: each policy file's name, size, modification
/// time, inode and change time, or the listing error. The inode and change time catch what
/// size and modification time miss: a same-size edit within the modification time's
/// granularity (whole seconds on some file systems) or one that keeps the old time (`cp -p`,
/// `rsync -a`, `touch -r`); a file replaced by rename is another inode.
type Fingerprint = Result<Vec<(PathBuf, FileStamp)>, String>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed: (i64, i64),
}

fn fingerprint(dir: &Path) -> Fingerprint {
    fingerprint_listed(dir).0
}

/// [`fingerprint`], and the names of every entry of `dir` (none when it cannot be listed),
/// from one listing.
fn fingerprint_listed(dir: &Path) -> (Fingerprint, Vec<std::ffi::OsString>) {
    match crate::parse::policy_files_listed(dir) {
        Ok((files, names)) => (Ok(stamps(files)), names),
        Err(e) => (Err(e.to_string()), Vec::new()),
    }
}

/// Each file with what tells a change of it.
fn stamps(files: Vec<PathBuf>) -> Vec<(PathBuf, FileStamp)> {
    use std::os::unix::fs::MetadataExt;
    files
        .into_iter()
        .map(|p| {
            let stamp = std::fs::metadata(&p).map_or_else(
                |_| FileStamp::default(),
                |m| FileStamp {
                    len: m.len(),
                    modified: m.modified().ok(),
                    inode: m.ino(),
                    changed: (m.ctime(), m.ctime_nsec()),
                },
            );
            (p, stamp)
        })
        .collect()
}

/// Polls the store's directory every `interval` and reloads once a change has held still for
/// one interval. Polling (rather than inotify) is simple and works the same on every
/// filesystem and editor's way of saving. Waiting for the directory to settle matters because
/// a half-saved state is often a *valid* policy: an editor that truncates and then writes
/// leaves an empty file (no apps: every app of that file would be dropped, its listeners
/// closed, its counters and limiters lost), a `git checkout` or `cp -r` a directory with some
/// files missing; a file cut at a line may even drop a restriction. Runs until dropped:
/// cancel-safe, as a reload runs to its end once begun (in the blocking pool).
pub async fn watch(store: Arc<PolicyStore>, interval: Duration) {
    // Apart: a reload waiting on a file that does not answer (a hung network mount) must not
    // hold back the minute ticks that end connections outside their allowed hours.
    tokio::join!(
        tick_minutes(&store, interval),
        reload_on_change(&store, interval)
    );
}

/// Tells open connections to be decided again as each minute begins, under a policy with
/// time windows (they open and close on whole minutes, of every offset `tz` can say).
async fn tick_minutes(store: &PolicyStore, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let minute = || Timestamp::now().0 / 60;
    let mut last_minute = minute();
    loop {
        ticker.tick().await;
        if minute() != last_minute {
            last_minute = minute();
            if store.current().policy.has_time_windows() {
                store.tick();
            }
        }
    }
}

async fn reload_on_change(store: &Arc<PolicyStore>, interval: Duration) {
    let dir = store.dir().to_path_buf();
    let mut settling: Option<Fingerprint> = None;
    // Files that look meant as policy files but are not read (`app.toml.txt`, `App.TOML`):
    // told once each as they appear, or an app saved under such a name is silently absent.
    // Looked for when the directory's names change (the look stats every entry).
    let mut ignored: Vec<PathBuf> = Vec::new();
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: files not read are told as the watcher starts.
    loop {
        ticker.tick().await;
        // Off the runtime's threads, as the reload is: listing a hung mount blocks, and the
        // minute ticks beside this loop (and the gateway's traffic) must go on.
        let d = dir.clone();
        let before = std::mem::take(&mut names);
        let Ok((now, names_now, ignored_now)) = tokio::task::spawn_blocking(move || {
            let (now, names_now) = fingerprint_listed(&d);
            let ignored_now = (names_now != before).then(|| crate::ignored_policy_files(&d));
            (now, names_now, ignored_now)
        })
        .await
        else {
            continue;
        };
        names = names_now;
        if let Some(ignored_now) = ignored_now {
            for (path, why) in &ignored_now {
                if !ignored.contains(path) {
                    tracing::warn!(file = %path.display(), "{why}: this file in the policy directory is not read");
                }
            }
            ignored = ignored_now.into_iter().map(|(p, _)| p).collect();
        }
        let read = store
            .read_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Some(retry) when the directory is read: it changed and settled, or an edit the
        // gateway's check refused is due to be tried again.
        let read_again = if now == read {
            settling = None;
            store.check_retry_due().then_some(true)
        } else if settling.as_ref() == Some(&now) {
            settling = None;
            Some(false)
        } else {
            settling = Some(now);
            None
        };
        if let Some(retry) = read_again {
            // Errors are logged and recorded by reload itself. It reads every file and
            // writes (and syncs) the accepted copy: off the runtime's threads, which carry
            // the gateway's traffic meanwhile. Once begun it runs to its end, even if this
            // watcher is dropped meanwhile.
            let s = store.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || s.reload_as(retry)).await {
                if e.is_panic() {
                    // As a reload on this task did: the gateway's supervisor sees it.
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        store.current().maintain();
    }
}

/// Stops the watcher task when dropped.
#[derive(Debug)]
pub struct WatcherGuard(tokio::task::JoinHandle<()>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns [`watch`] on the current tokio runtime.
pub fn spawn_watcher(store: Arc<PolicyStore>, interval: Duration) -> WatcherGuard {
    WatcherGuard(tokio::spawn(watch(store, interval)))
}
