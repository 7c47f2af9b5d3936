//! The policy language: schema, parser, compiler, evaluator, limiters and hot reload.
//!
//! Users write TOML files (`[app.NAME]` tables) in a policy directory; see `README.md` beside
//! this crate for the format. The gateway loads them with [`PolicyStore::load`], keeps them
//! fresh with [`spawn_watcher`], and per request does
//! `store.current()` → [`CompiledPolicy::route_http`] / [`CompiledPolicy::app_by_listen`] →
//! [`CompiledPolicy::decide`] → [`AppLimits::check_rate`] / [`AppLimits::connect`] →
//! [`accounting::AppCounters`]. Mesh streams use [`CompiledPolicy::decide_mesh`].
//!
//! # Layout
//! - [`units`]: value syntaxes (rates, sizes, hours, offsets, names, path prefixes).
//! - `schema`: the TOML format as serde types (`deny_unknown_fields` everywhere).
//! - [`error`]: [`PolicyError`], displayed as `path:line:col: message`.
//! - `parse`: reading a directory, collecting every error of every file ([`check_dir`]).
//! - `compile`: checking one app; `policy`: cross-app checks and the lookup tables of
//!   [`CompiledPolicy`].
//! - [`model`]: compiled apps, rules and limits.
//! - `eval`: routing and [`Decision`]s; `explain`: the same, as text for people.
//! - [`limits`], [`bandwidth`]: rate limiters, connection guards, bandwidth shapers.
//! - [`accounting`]: per-app counters and their `/status` and `/metrics` forms.
//! - [`store`]: the live policy, reload and the directory watcher; [`mod@diff`]: what a reload
//!   changed; [`accepted`]: the copy of the last accepted files a restart falls back to.
//!
//! # Semantics in one place
//! - Deny by default: an app without `allow` admits nobody; a request no rule admits is
//!   refused with the [`DenyReason`] of the rule that came closest.
//! - `public` admits everybody; `zone` every zone device; `device:NAME`, `role:NAME` and
//!   CIDRs what they say.
//! - Time windows use a fixed UTC offset (`tz`, default UTC); no daylight-saving rules.

pub mod accepted;
pub mod accounting;
pub mod bandwidth;
pub mod diff;
pub mod error;
pub mod limits;
pub mod model;
pub mod store;
pub mod units;

mod compile;
mod eval;
mod explain;
pub use explain::Explanation;
mod parse;
mod policy;
mod schema;

pub use diff::{diff, Change};
pub use error::{PolicyError, Position};
#[doc(hidden)]
pub use eval::fold_name_matching;
pub use eval::{is_host, Decision, DenyReason, MeshDecision, Requester, Timestamp};
pub use limits::{AppLimits, ConnGuard, LimitKey, RateTaken, RetryAfter};
pub use model::*;
pub use parse::{
    check_dir, check_dir_sources, check_read, check_sources, check_str, ignored_policy_files,
    policy_files, read_dir_sources, Sources, MAX_FILE_BYTES,
};
pub use policy::CompiledPolicy;
pub use schema::{Day, Per};
pub use store::{
    spawn_watcher, watch, Active, AppNames, AppState, CheckError, CheckRefusal, PolicyStore,
    ReloadCheck, ReloadStatus,
};
