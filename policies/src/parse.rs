//! Reading policy files: TOML syntax, the schema, then validation, collecting every error of
//! every file (one bad app or file never hides the problems of the others).

use crate::compile::compile_app;
use crate::error::{PolicyError, SourceText};
use crate::model::Source;
use crate::policy::{assemble, CompiledPolicy, PendingApp};
use crate::schema::AppSpec;
use crate::units;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// Largest policy file read. Policy files are hand-written and small; the bound keeps a stray
/// large file in the directory from costing memory on every reload.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Parses, validates and compiles every `*.toml` file directly in `dir` (sorted by name;
/// sub-directories and hidden files are ignored). An empty directory is a valid policy that
/// denies everything.
pub fn check_dir(dir: &Path) -> Result<CompiledPolicy, Vec<PolicyError>> {
    check_dir_sources(dir).map(|(policy, _)| policy)
}

/// Policy files as `(path, text)`, in the order they are checked.
pub type Sources = Vec<(PathBuf, String)>;

/// [`check_dir`], also giving back the `(path, text)` of each file that compiled.
pub fn check_dir_sources(dir: &Path) -> Result<(CompiledPolicy, Sources), Vec<PolicyError>> {
    let (sources, errs) = read_dir_sources(dir).map_err(|e| vec![e])?;
    check_read(sources, errs)
}

/// The text of every policy file of `dir` that could be read, and an error for each that
/// could not (an error alone when the directory cannot be listed).
pub fn read_dir_sources(dir: &Path) -> Result<(Sources, Vec<PolicyError>), PolicyError> {
    let files = policy_files(dir)?;
    let mut sources = Vec::with_capacity(files.len());
    let mut errs = Vec::new();
    for path in files {
        match read_file(&path) {
            Ok(src) => sources.push((path, src)),
            Err(e) => errs.push(e),
        }
    }
    Ok((sources, errs))
}

/// Compiles what [`read_dir_sources`] read; its read errors fail it too.
pub fn check_read(
    sources: Sources,
    mut errs: Vec<PolicyError>,
) -> Result<(CompiledPolicy, Sources), Vec<PolicyError>> {
    match check_sources(&sources) {
        Ok(p) if errs.is_empty() => Ok((p, sources)),
        Ok(_) => Err(errs),
        Err(mut more) => {
            errs.append(&mut more);
            Err(errs)
        }
    }
}

/// Checks one file's text as if it were the whole policy (tests, `policy check FILE`).
pub fn check_str(path: &Path, src: &str) -> Result<CompiledPolicy, Vec<PolicyError>> {
    check_sources(&[(path.to_path_buf(), src.to_string())])
}

/// Checks several `(path, text)` files together (app names and routes must not collide).
pub fn check_sources(sources: &[(PathBuf, String)]) -> Result<CompiledPolicy, Vec<PolicyError>> {
    let mut errs = Vec::new();
    let mut pending = Vec::new();
    for (path, src) in sources {
        parse_file(path, src, &mut pending, &mut errs);
    }
    let files = sources.iter().map(|(p, _)| p.clone()).collect();
    match assemble(pending, files) {
        Ok(p) if errs.is_empty() => Ok(p),
        Ok(_) => Err(capped(sorted(errs))),
        Err(mut more) => {
            errs.append(&mut more);
            Err(capped(sorted(errs)))
        }
    }
}

/// Errors told per file at most: a file of thousands of broken lines is told by its first
/// ones (the rest mostly repeat them), not by a log line for each.
pub const MAX_ERRORS_PER_FILE: usize = 100;

/// `errs` (sorted, so grouped by file) with at most [`MAX_ERRORS_PER_FILE`] per file, then a
/// line saying how many more there are.
fn capped(errs: Vec<PolicyError>) -> Vec<PolicyError> {
    let mut out: Vec<PolicyError> = Vec::with_capacity(errs.len().min(4 * MAX_ERRORS_PER_FILE));
    let mut told = 0;
    let mut untold = 0;
    let mut last: Option<PathBuf> = None;
    let flush = |out: &mut Vec<PolicyError>, path: Option<PathBuf>, untold: usize| {
        if let (Some(path), true) = (path, untold > 0) {
            out.push(PolicyError::whole(
                &path,
                format!("{untold} more errors in this file, not listed: fix the ones above first"),
            ));
        }
    };
    for e in errs {
        if last.as_ref() != Some(&e.path) {
            flush(&mut out, last.take(), untold);
            (told, untold) = (0, 0);
            last = Some(e.path.clone());
        }
        if told < MAX_ERRORS_PER_FILE {
            told += 1;
            out.push(e);
        } else {
            untold += 1;
        }
    }
    flush(&mut out, last, untold);
    out
}

/// File order, then position: the order a person fixes them in.
fn sorted(mut errs: Vec<PolicyError>) -> Vec<PolicyError> {
    errs.sort_by_key(|e| (e.path.clone(), e.position.map(|p| (p.line, p.column))));
    errs
}

/// serde names our Rust types in messages ("expected struct AppSpec"); say what the user
/// writes instead.
fn friendly(msg: &str) -> String {
    // A list where one value goes: most likely two windows of `hours` (it was told as a
    // missing quote, with `listen` as the example).
    if msg.contains("invalid type: sequence, expected a string") {
        return msg.replace(
            "invalid type: sequence, expected a string",
            "a list where one value goes (`host`, `path`, `to`, `listen`, `hours` and each limit take one; an app with two hosts is two apps; for two windows of `hours`, write two rules, e.g. `allow = [{ from = [\"public\"], hours = \"09:00-12:00\" }, { from = [\"public\"], hours = \"13:00-17:00\" }]`)",
        );
    }
    msg.replace("struct AppSpec", "an app table such as `[app.NAME]`")
        .replace(
            "struct HttpSpec",
            "a table such as `{ host = \"alice.example\", path = \"/dfs\" }`",
        )
        .replace(
            "struct ListenSpec",
            "a table such as `{ listen = \"0.0.0.0:2222\" }` (a tcp app may add `proxy_protocol = true`)",
        )
        .replace(
            "struct RuleSpec",
            "a rule table such as `{ from = [\"public\"] }`",
        )
        .replace(
            "struct LimitsSpec",
            "a limits table such as `{ rate = \"50/s\" }`",
        )
        // `burst = "100"`, `max_connections = -1`: serde names the Rust type.
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295, without quotes",
        )
        // `rate = 50`, `max_body = 10485760`: a number where text with a unit goes.
        .replace(
            "expected a string",
            "expected text in quotes, such as `listen = \"0.0.0.0:2222\"` (limits take a unit: `rate = \"50/s\"`, `max_body = \"10MiB\"`, `bandwidth = \"20MiB/s\"`)",
        )
        // `from = "public"` for `from = ["public"]`, the likeliest slip.
        .replace(
            "expected a sequence",
            "expected a list: write it in brackets, such as `[\"public\"]` or `[\"GET\", \"HEAD\"]`",
        )
}

/// The `*.toml` files of `dir`, sorted. Also used by the watcher to fingerprint the directory.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    Ok(policy_files_listed(dir)?.0)
}

/// [`policy_files`], and the names of every entry of `dir` (sorted), from one listing: the
/// watcher looks for files it does not read when those change.
pub(crate) fn policy_files_listed(
    dir: &Path,
) -> Result<(Vec<PathBuf>, Vec<std::ffi::OsString>), PolicyError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| PolicyError::unreadable(dir, format!("cannot read policy directory: {e}")))?;
    let mut files = Vec::new();
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry
            .map_err(|e| PolicyError::whole(dir, format!("cannot list policy directory: {e}")))?;
        let path = entry.path();
        let file_name = entry.file_name();
        let name = file_name.to_string_lossy();
        // Hidden files are editor droppings (".#x.toml" locks); only regular *.toml count.
        let toml = !name.starts_with('.') && path.extension().is_some_and(|e| e == "toml");
        names.push(file_name);
        // A directory named like a policy file is listed too, to be refused as one that
        // cannot be read ([`read_file`]): skipped, the apps of the file it replaced
        // (`rm x.toml; mkdir x.toml`, an archive unpacked over it) dropped unsaid.
        if toml {
            files.push(path);
        }
    }
    files.sort();
    names.sort();
    Ok((files, names))
}

/// Entries of `dir` that look meant as policy files but are not read, each with why: an
/// extension `.TOML` in other letters, a `.toml.txt` (Notepad's save), a sub-directory holding
/// `*.toml` files. `zonegate policy check` names them: "ok: 0 files" said nothing of them.
pub fn ignored_policy_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_lowercase();
        if name.starts_with('.') {
            continue;
        }
        let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
        let why = if is_dir && name.ends_with(".toml") {
            // Refused as a policy file that cannot be read ([`policy_files_listed`]).
            None
        } else if is_dir {
            let holds_toml = std::fs::read_dir(&path).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "toml"))
            });
            holds_toml
                .then_some("a sub-directory: only files directly in the policy directory are read")
        } else if name.ends_with(".toml") && path.extension().is_none_or(|e| e != "toml") {
            Some("only names ending in .toml, in lower case, are read")
        } else if name.ends_with(".toml.txt") {
            Some("saved with .txt added: only names ending in .toml are read")
        } else if name.trim_end() != name && name.trim_end().ends_with(".toml") {
            Some("its name ends in a space after .toml: only names ending in .toml are read")
        } else if name.ends_with(".tml") {
            Some("only names ending in .toml are read")
        } else {
            None
        };
        if let Some(why) = why {
            out.push((path, why));
        }
    }
    out.sort();
    out
}

fn read_file(path: &Path) -> Result<String, PolicyError> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| match std::fs::read_link(path) {
        // Listed, yet "No such file or directory": a link whose target is missing. Still
        // unreadable (a start exits 1, which the unit retries: the link may point into a
        // mount not up yet), but said as what it is.
        Ok(target) if e.kind() == std::io::ErrorKind::NotFound => PolicyError::unreadable(
            path,
            format!(
                "is a link to {}, which does not exist (a mount not up yet?): fix the link or remove it",
                target.display()
            ),
        ),
        _ => PolicyError::unreadable(path, format!("cannot read: {e}")),
    })?;
    // A FIFO would block the open (and every reload after it), a device (or a link to
    // /dev/zero) reads for ever: neither is a policy.
    if meta.is_dir() {
        return Err(PolicyError::whole(
            path,
            "is a directory, named like a policy file: rename it or move it out of the policy directory (only files directly in it are read)",
        ));
    }
    if !meta.is_file() {
        return Err(PolicyError::whole(
            path,
            "not a regular file (a FIFO, device or socket): remove it or move it out of the policy directory",
        ));
    }
    let too_big = || {
        PolicyError::whole(
            path,
            format!("file is larger than {MAX_FILE_BYTES} bytes: split it into several files"),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            // A file copied in by root with a strict umask: `policy check` run as root reads
            // it, the gateway's own user does not.
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    ": make it readable by the user the gateway runs as (chmod a+r, or chown)"
                }
                _ => "",
            };
            PolicyError::unreadable(path, format!("cannot read: {e}{hint}"))
        })?;
    // It grew while being read.
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        PolicyError::whole(
            path,
            format!(
                "not UTF-8 text (byte {}): save the file as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Whether `line` holds an odd number of `"` (escaped ones and a comment's not counted), not
/// in a multi-line string: a basic string opened and not closed on it.
fn unpaired_quote(line: &str) -> bool {
    if line.contains("\"\"\"") {
        return false;
    }
    let (mut quotes, mut in_string, mut escaped) = (0, false, false);
    for c in line.chars() {
        match c {
            '\\' if in_string && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => {
                quotes += 1;
                in_string = !in_string;
            }
            '#' if !in_string => break,
            _ => {}
        }
        escaped = false;
    }
    quotes % 2 == 1
}

fn toml_error(path: &Path, text: &SourceText<'_>, e: &toml::de::Error) -> PolicyError {
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => PolicyError::at(path, text, span, message),
        None => PolicyError::whole(path, message),
    }
}

fn parse_file(path: &Path, src: &str, pending: &mut Vec<PendingApp>, errs: &mut Vec<PolicyError>) {
    let first = pending.len();
    parse_tables(path, src, pending, errs);
    // The TOML table is a sorted map; keep apps in the order they are written.
    pending[first..].sort_by_key(|p| (p.source.position.line, p.source.position.column));
}

fn parse_tables(
    path: &Path,
    src: &str,
    pending: &mut Vec<PendingApp>,
    errs: &mut Vec<PolicyError>,
) {
    let text = SourceText::new(src);
    let (root, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        // The recovered table is a guess; checking its meaning would add confusing errors.
        // And the recovery reads on past a mistake through it: a string left open gave ten
        // errors on its line, the last on screen the least useful, none naming it. So the
        // first of each line only, with a hint where the line's quotes do not pair up.
        let mut lines = std::collections::BTreeSet::new();
        for e in &syntax {
            let mut err = toml_error(path, &text, e);
            let Some(line) = err.position.map(|p| p.line) else {
                errs.push(err);
                continue;
            };
            if !lines.insert(line) {
                continue;
            }
            if src.lines().nth(line - 1).is_some_and(unpaired_quote) {
                err.message.push_str(
                    " (this line's double quotes do not pair up: is a string left unclosed?)",
                );
            }
            errs.push(err);
        }
        return;
    }
    for (key, value) in root.into_inner() {
        if key.get_ref() != "app" {
            errs.push(PolicyError::at(
                path,
                &text,
                key.span(),
                format!("unknown key `{}`, expected `app`", key.get_ref()),
            ));
            continue;
        }
        let value_span = value.span();
        let DeValue::Table(apps) = value.into_inner() else {
            errs.push(PolicyError::at(
                path,
                &text,
                value_span,
                "expected a table of apps: `[app.NAME]`",
            ));
            continue;
        };
        for (name, spec) in apps {
            let name_span = name.span();
            let name = name.into_inner().into_owned();
            if let Err(m) = units::check_label(&name, "app") {
                errs.push(PolicyError::at(path, &text, name_span.clone(), m));
                continue;
            }
            // One app at a time, so a schema error in one app does not hide the others.
            let spec = match AppSpec::deserialize(ValueDeserializer::from(spec)) {
                Ok(s) => s,
                Err(e) => {
                    let mut err = toml_error(path, &text, &e);
                    if err.position.is_none() {
                        err.position = Some(text.position(name_span.start));
                    }
                    err.message = format!("app `{name}`: {}", friendly(&err.message));
                    errs.push(err);
                    continue;
                }
            };
            let listener_span = [
                spec.http.as_ref().map(|h| h.span()),
                spec.tcp.as_ref().map(|t| t.span()),
                spec.udp.as_ref().map(|u| u.span()),
            ]
            .into_iter()
            .flatten()
            .next()
            .unwrap_or_else(|| name_span.clone());
            match compile_app(spec, name_span.clone()) {
                Ok(parts) => pending.push(PendingApp {
                    name,
                    parts,
                    source: Source {
                        path: path.to_path_buf(),
                        position: text.position(name_span.start),
                    },
                    listener_pos: text.position(listener_span.start),
                }),
                Err(list) => errs.extend(list.into_iter().map(|e| {
                    PolicyError::at(path, &text, e.span, format!("app `{name}`: {}", e.message))
                })),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "[app.web]\nhttp = { host = \"alice.example\" }\nto = \"home1/web\"\n";

    /// `proxy_protocol` is a tcp app's: kept on its app (and in its summary), refused on a
    /// udp app with what to do instead.
    #[test]
    fn proxy_protocol_is_for_tcp_apps() {
        let p = Path::new("a.toml");
        let tcp = "[app.smtp]\ntcp = { listen = \"0.0.0.0:25\", proxy_protocol = true }\nto = \"home1/smtp\"\n";
        let policy = check_str(p, tcp).unwrap();
        let app = policy.app("smtp").unwrap();
        assert!(app.proxy_protocol);
        assert_eq!(app.summary(), "tcp 0.0.0.0:25 (PROXY v2) -> home1/smtp");
        let udp = "[app.dns]\nudp = { listen = \"0.0.0.0:53\", proxy_protocol = true }\nto = \"home1/dns\"\n";
        let errs = check_str(p, udp).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .contains("`proxy_protocol` is for tcp apps"),
            "{errs:?}"
        );
    }

    /// A number where text with a unit goes says what to write, not serde's "a string".
    #[test]
    fn a_number_for_a_limit_says_to_write_a_unit() {
        let p = Path::new("a.toml");
        let text = format!("{APP}limits = {{ rate = 50 }}\n");
        let e = check_str(p, &text).unwrap_err()[0].to_string();
        assert!(
            e.contains("expected text in quotes") && e.contains("\"50/s\""),
            "{e}"
        );
    }

    /// Two windows of `hours` as a list: told to write two rules (it was told as a missing
    /// quote, with `listen` as the example). The rules it suggests are valid.
    #[test]
    fn a_list_of_hours_says_to_write_two_rules() {
        let p = Path::new("a.toml");
        let text = format!(
            "{APP}allow = {{ from = [\"public\"], hours = [\"09:00-12:00\", \"13:00-17:00\"] }}\n"
        );
        let e = check_str(p, &text).unwrap_err()[0].to_string();
        assert!(
            e.contains("for two windows of `hours`, write two rules"),
            "{e}"
        );
        let two = format!("{APP}allow = [{{ from = [\"public\"], hours = \"09:00-12:00\" }}, {{ from = [\"public\"], hours = \"13:00-17:00\" }}]\n");
        assert_eq!(check_str(p, &two).expect("valid").apps()[0].rules.len(), 2);
    }

    /// A service an app sends PROXY headers to is reached by no app without one: a client of
    /// that app could send its own header and pass for any address. Two apps that both send
    /// one are fine.
    #[test]
    fn a_proxy_protocol_service_is_reached_with_the_header_only() {
        let p = Path::new("a.toml");
        let smtp = "[app.smtp]\ntcp = { listen = \"0.0.0.0:25\", proxy_protocol = true }\nto = \"home1/smtp\"\n";
        let submission = "[app.submission]\ntcp = { listen = \"0.0.0.0:587\", proxy_protocol = true }\nto = \"home1/smtp\"\n";
        check_str(p, &format!("{smtp}{submission}")).unwrap();
        for bare in [
            "[app.alt]\ntcp = { listen = \"0.0.0.0:2525\" }\nto = \"home1/smtp\"\n",
            "[app.alt]\nmesh = true\nto = \"home1/smtp\"\n",
            "[app.alt]\nhttp = { host = \"mail.alice.example\" }\nto = \"home1/smtp\"\n",
        ] {
            // Either order: the error is at the app without the header.
            for text in [format!("{smtp}{bare}"), format!("{bare}{smtp}{submission}")] {
                let errs = check_str(p, &text).unwrap_err();
                assert_eq!(errs.len(), 1, "{errs:?}");
                let e = errs[0].to_string();
                assert!(
                    e.contains("app `alt`: reaches home1/smtp without a PROXY header")
                        && e.contains("give `alt` `proxy_protocol = true`"),
                    "{e}"
                );
            }
        }
    }

    /// A link to a device is refused at once (it used to be read until memory ran out), a
    /// directory named like a policy file (linked or not) is refused — skipped, the apps of a
    /// file it replaced went unsaid — and a file in another encoding says so.
    #[cfg(unix)]
    #[test]
    fn only_regular_utf8_files_are_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.toml"), APP).unwrap();
        let sub = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(sub.path(), d.path().join("d.toml")).unwrap();
        let errs = check_dir(d.path()).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].to_string().contains("d.toml: is a directory"),
            "{errs:?}"
        );
        std::fs::remove_file(d.path().join("d.toml")).unwrap();

        std::os::unix::fs::symlink("/dev/zero", d.path().join("z.toml")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_owned();
        std::thread::spawn(move || tx.send(check_dir(&dir).map(|_| ())));
        let errs = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("answered in time")
            .unwrap_err();
        assert!(
            errs[0].to_string().contains("not a regular file"),
            "{errs:?}"
        );
        std::fs::remove_file(d.path().join("z.toml")).unwrap();

        // A link whose target is missing says so (not only "cannot read").
        std::os::unix::fs::symlink("gone.conf", d.path().join("g.toml")).unwrap();
        let errs = check_dir(d.path()).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .contains("is a link to gone.conf, which does not exist")
                && errs[0].unreadable,
            "{errs:?}"
        );
        std::fs::remove_file(d.path().join("g.toml")).unwrap();

        std::fs::write(d.path().join("l.toml"), b"# caf\xe9\n").unwrap();
        let errs = check_dir(d.path()).unwrap_err();
        assert!(
            errs[0].to_string().contains("save the file as UTF-8"),
            "{errs:?}"
        );
    }
}
