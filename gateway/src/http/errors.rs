//! Why a request got no answer from a service, who caused it (client, policy, device,
//! gateway), and the short plain-text answer the client gets: 404 no route, 403/405 refused by
//! the app's rules, 408 stalled request body, 413 body too large, 429 rate limit, 502 device
//! offline or broken upstream, 504 timeout.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use policies::DenyReason;
use tunnel::proto::RefuseCode;
use tunnel::OpenError;

/// Who a failure is down to (pingora's `ErrorSource`): decides the status class and the log
/// level, and keeps a misbehaving device apart from a misbehaving client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Policy,
    Upstream,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the request names no host, or several (HTTP/1.1 takes exactly one Host line)")]
    NoHost,
    #[error("the request's host {host:?} is not a host name")]
    BadHost { host: String },
    #[error("the request target or host holds a control character")]
    BadTarget,
    #[error("{method} is not proxied: {why}")]
    MethodNotSupported { method: String, why: &'static str },
    #[error("a {method} request with a body")]
    BodyNotAllowed { method: String },
    #[error("the request expects {expect:?}, which the gateway does not know")]
    ExpectationFailed { expect: String },
    #[error("redirected to {location} (the app's path, with its slash)")]
    SlashRedirect { location: String },
    #[error("the request target is {len} bytes, more than {max}", max = super::proxy::MAX_TARGET)]
    UriTooLong { len: usize },
    #[error("no app serves {host}{path}: {why}")]
    NoRoute {
        host: String,
        path: String,
        /// [`policies::CompiledPolicy::why_no_route`].
        why: String,
    },
    #[error("app {app} does not allow {method}")]
    MethodNotAllowed {
        app: String,
        method: String,
        allow: Vec<String>,
    },
    #[error("app {app} refuses this request: {reason}")]
    Denied { app: String, reason: DenyReason },
    #[error("app {app}: too many requests")]
    RateLimited { app: String, retry_after: Duration },
    #[error("app {app}: too many requests in progress: {which}")]
    TooManyConnections {
        app: String,
        /// Which limit: the app's `max_connections` or `max_connections_per_client`.
        which: policies::limits::ConnLimitExceeded,
    },
    #[error("app {app}: request body larger than {max} bytes")]
    BodyTooLarge { app: String, max: u64 },
    #[error("the client sent no more of its request body for {secs} s")]
    BodyStalled { secs: u64 },
    /// The request body failed on the client's side: the client closed its connection (or
    /// reset its HTTP/2 stream) before the body ended, or its chunked encoding was malformed.
    #[error("the request body could not be read: {reason}")]
    ClientBody { reason: String },
    #[error("app {app}: {error}")]
    Open {
        app: String,
        service: String,
        error: OpenError,
    },
    #[error("app {app}: {}", timed_out(device, *secs, *upload_stalled))]
    UpstreamTimeout {
        app: String,
        device: String,
        secs: u64,
        /// The service stopped taking the request's body (for `secs`), rather than not
        /// answering within them.
        upload_stalled: bool,
    },
    #[error("app {app}: device {device}: {error}")]
    Upstream {
        app: String,
        device: String,
        error: super::upstream::UpstreamError,
    },
    #[error("the gateway is shutting down")]
    Draining,
}

/// What a [`ProxyError::UpstreamTimeout`] says happened.
fn timed_out(device: &str, secs: u64, upload_stalled: bool) -> String {
    match upload_stalled {
        true => {
            format!("the service on device {device} stopped taking the request body for {secs} s")
        }
        false => format!("device {device} did not answer within {secs} s"),
    }
}

impl ProxyError {
    /// Whose doing the error is (named `blame`, not `source`: an inherent `source` would
    /// shadow `std::error::Error::source` for callers).
    pub fn blame(&self) -> Source {
        match self {
            ProxyError::NoHost
            | ProxyError::BadHost { .. }
            | ProxyError::BadTarget
            | ProxyError::MethodNotSupported { .. }
            | ProxyError::BodyNotAllowed { .. }
            | ProxyError::ExpectationFailed { .. }
            | ProxyError::SlashRedirect { .. }
            | ProxyError::UriTooLong { .. }
            | ProxyError::NoRoute { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BodyStalled { .. }
            | ProxyError::ClientBody { .. } => Source::Client,
            ProxyError::MethodNotAllowed { .. }
            | ProxyError::Denied { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::TooManyConnections { .. } => Source::Policy,
            ProxyError::Open { error, .. } => match error {
                OpenError::Refused {
                    code: RefuseCode::PolicyDenied | RefuseCode::RateLimited,
                    ..
                } => Source::Policy,
                _ => Source::Upstream,
            },
            ProxyError::UpstreamTimeout { .. } | ProxyError::Upstream { .. } => Source::Upstream,
            ProxyError::Draining => Source::Gateway,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoHost
            | ProxyError::BadHost { .. }
            | ProxyError::BadTarget
            | ProxyError::ClientBody { .. }
            | ProxyError::BodyNotAllowed { .. } => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotSupported { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ExpectationFailed { .. } => StatusCode::EXPECTATION_FAILED,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::SlashRedirect { .. } => StatusCode::PERMANENT_REDIRECT,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::TooManyConnections { .. } | ProxyError::Draining => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Open { error, .. } => match error {
                OpenError::Offline(_)
                | OpenError::NotInZone(_)
                | OpenError::Revoked(_)
                | OpenError::Tunnel { .. } => StatusCode::BAD_GATEWAY,
                OpenError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                OpenError::Refused { code, .. } => match code {
                    RefuseCode::PolicyDenied => StatusCode::FORBIDDEN,
                    RefuseCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                    RefuseCode::Overloaded | RefuseCode::Draining => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::BAD_GATEWAY,
                },
            },
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// One or two short lines for a person: what happened and, where it helps, what to do.
    pub fn body(&self) -> String {
        match self {
            ProxyError::NoHost => "400 bad request: the request names no host, or several (HTTP/1.1 takes exactly one Host line)\n".into(),
            ProxyError::BadHost { host } => format!(
                "400 bad request: {host:?} is not a host: a name of letters, digits, '-' and '.', or an IP address, then at most :PORT\n"
            ),
            ProxyError::BadTarget => {
                "400 bad request: the request target or host holds a control character or space; percent-encode it\n".into()
            }
            ProxyError::MethodNotSupported { method, why } => {
                format!("501 not implemented: {method} is not proxied: {why}\n")
            }
            ProxyError::SlashRedirect { location } => {
                format!("308 permanent redirect: to {location}\n")
            }
            ProxyError::BodyNotAllowed { method } => format!(
                "400 bad request: a {method} request with a body (a service may take the body for another request); send it with POST\n"
            ),
            ProxyError::ExpectationFailed { expect } => format!(
                "417 expectation failed: the request expects {expect:?}; the only expectation known is 100-continue (send the request without this Expect header)\n"
            ),
            ProxyError::UriTooLong { len } => format!(
                "414 URI too long: the request target is {len} bytes; the gateway forwards at most {}\n",
                super::proxy::MAX_TARGET
            ),
            // Why stays in the gateway's log: it names apps and their paths, the policy's
            // business, not a public client's.
            ProxyError::NoRoute { host, path, .. } => {
                format!("404 not found: no app serves {host}{path}\n")
            }
            ProxyError::MethodNotAllowed { app, method, allow } => format!(
                "405 method not allowed: app {app} does not allow {method} (allowed: {})\n",
                allow.join(", ")
            ),
            ProxyError::Denied { app, reason } => {
                format!("403 forbidden: app {app} refuses this request: {reason}\n")
            }
            ProxyError::RateLimited { app, retry_after } => format!(
                "429 too many requests: app {app} is rate limited; retry in {} s\n",
                retry_secs(*retry_after)
            ),
            ProxyError::TooManyConnections { app, which } => match which {
                policies::limits::ConnLimitExceeded::Client => format!(
                    "503 unavailable: app {app} has as many requests of yours in progress as it takes\n"
                ),
                policies::limits::ConnLimitExceeded::App => {
                    format!("503 unavailable: app {app} has too many requests in progress\n")
                }
            },
            ProxyError::BodyTooLarge { app, max } => {
                format!("413 payload too large: app {app} accepts request bodies up to {max} bytes\n")
            }
            ProxyError::BodyStalled { secs } => format!(
                "408 request timeout: no more of the request body arrived for {secs} s; send it again\n"
            ),
            ProxyError::ClientBody { reason } => {
                format!("400 bad request: the request body could not be read: {reason}\n")
            }
            ProxyError::Open {
                app,
                service,
                error,
            } => match error {
                OpenError::Offline(d) => format!(
                    "502 bad gateway: app {app}: device {d} is offline (its node agent is not connected to the gateway)\n"
                ),
                OpenError::NotInZone(d) => format!(
                    "502 bad gateway: app {app}: there is no device {d} in the zone (the app names a device the zone config does not list)\n"
                ),
                OpenError::Revoked(d) => format!(
                    "502 bad gateway: app {app}: device {d} is revoked (the app names a device the zone config revokes)\n"
                ),
                OpenError::Timeout(d) => {
                    format!("504 gateway timeout: app {app}: device {d} did not answer in time\n")
                }
                OpenError::Tunnel { device, .. } => {
                    format!("502 bad gateway: app {app}: the tunnel to device {device} failed\n")
                }
                // The device's own reason stays in the log line (the error's Display): it is
                // the device's text (an internal address, a parse error), not the public's.
                OpenError::Refused { device, code, .. } => match code {
                    RefuseCode::NoSuchService => format!(
                        "502 bad gateway: app {app}: device {device} does not offer service {service}\n"
                    ),
                    RefuseCode::ServiceUnreachable => format!(
                        "502 bad gateway: app {app}: service {service} on device {device} is not answering (is it running?)\n"
                    ),
                    code => {
                        let (status, what) = match code {
                            RefuseCode::PolicyDenied => ("403 forbidden".into(), "refused the request"),
                            RefuseCode::RateLimited => (
                                "429 too many requests".into(),
                                "is limiting requests; try again later",
                            ),
                            RefuseCode::Overloaded => ("503 unavailable".into(), "is busy; try again"),
                            RefuseCode::Draining => ("503 unavailable".into(), "is stopping; try again"),
                            _ => (self.status().to_string(), "refused the request"),
                        };
                        format!("{status}: app {app}: device {device} {what}\n")
                    }
                },
            },
            ProxyError::UpstreamTimeout {
                app,
                device,
                secs,
                upload_stalled,
            } => format!(
                "504 gateway timeout: app {app}: {}\n",
                timed_out(device, *secs, *upload_stalled)
            ),
            ProxyError::Upstream { app, device, error } if error.tunnel_lost() => format!(
                "502 bad gateway: app {app}: the tunnel to device {device} was lost before the service answered (its node agent reconnected or went away); try again\n"
            ),
            ProxyError::Upstream { app, device, error } if error.ended_unanswered() => format!(
                "502 bad gateway: app {app}: the service on device {device} closed the connection without answering\n"
            ),
            ProxyError::Upstream { app, device, .. } => format!(
                "502 bad gateway: app {app}: device {device} sent no valid HTTP answer\n"
            ),
            ProxyError::Draining => "503 unavailable: the gateway is shutting down\n".into(),
        }
    }

    /// The answer sent to the client.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.body())));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        plain_text_headers(h);
        match self {
            ProxyError::RateLimited { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, retry_secs(*retry_after).into());
            }
            ProxyError::TooManyConnections { .. } | ProxyError::Draining => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::SlashRedirect { location } => {
                if let Ok(v) = HeaderValue::from_str(location) {
                    h.insert(header::LOCATION, v);
                }
            }
            ProxyError::MethodNotAllowed { allow, .. } => {
                if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                    h.insert(header::ALLOW, v);
                }
            }
            _ => {}
        }
        r
    }
}

/// The headers of the gateway's own short answers: plain text, not stored, and never sniffed
/// as HTML (the text echoes the client's host, path or method).
pub fn plain_text_headers(h: &mut http::HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Whole seconds for `Retry-After`, rounded up and at least 1 (0 would invite a hot loop).
pub fn retry_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(error: OpenError) -> ProxyError {
        ProxyError::Open {
            app: "dfs".into(),
            service: "dfs".into(),
            error,
        }
    }

    #[test]
    fn statuses_and_bodies() {
        let off = open(OpenError::Offline("home1".into()));
        assert_eq!(off.status(), 502);
        assert!(off.body().contains("app dfs") && off.body().contains("device home1"));
        assert_eq!(off.blame(), Source::Upstream);
        let unlisted = open(OpenError::NotInZone("home9".into()));
        assert_eq!(unlisted.status(), 502);
        assert!(unlisted.body().contains("no device home9 in the zone"));
        let revoked = open(OpenError::Revoked("home3".into()));
        assert_eq!(revoked.status(), 502);
        assert!(revoked.body().contains("device home3 is revoked"));
        assert_eq!(open(OpenError::Timeout("home1".into())).status(), 504);
        let denied = open(OpenError::Refused {
            device: "home1".into(),
            code: RefuseCode::PolicyDenied,
            reason: "no".into(),
        });
        assert_eq!(
            (denied.status(), denied.blame()),
            (StatusCode::FORBIDDEN, Source::Policy)
        );
        // The device's own text goes to the log, not to the public.
        let bad = open(OpenError::Refused {
            device: "home1".into(),
            code: RefuseCode::BadRequest,
            reason: "stream header: connect 10.0.0.5:8080 refused".into(),
        });
        assert!(!bad.body().contains("10.0.0.5"), "{}", bad.body());
        assert!(
            bad.body().contains("device home1 refused"),
            "{}",
            bad.body()
        );
        assert!(bad.to_string().contains("10.0.0.5"), "{bad}");
        let nosvc = open(OpenError::Refused {
            device: "home1".into(),
            code: RefuseCode::NoSuchService,
            reason: "x".into(),
        });
        assert_eq!(nosvc.status(), 502);
        assert!(nosvc.body().contains("does not offer service dfs"));
        let nr = ProxyError::NoRoute {
            host: "a.example".into(),
            path: "/x".into(),
            why: "no app has host a.example".into(),
        };
        assert_eq!(nr.body(), "404 not found: no app serves a.example/x\n");
        assert_eq!(
            nr.to_string(),
            "no app serves a.example/x: no app has host a.example"
        );
        assert_eq!(
            (nr.status(), nr.blame()),
            (StatusCode::NOT_FOUND, Source::Client)
        );
        // Which connection limit refused it: in the log line, and a client told its own.
        let mine = ProxyError::TooManyConnections {
            app: "lim".into(),
            which: policies::limits::ConnLimitExceeded::Client,
        };
        assert_eq!(mine.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            mine.to_string().contains("max_connections_per_client"),
            "{mine}"
        );
        assert!(mine.body().contains("requests of yours"), "{}", mine.body());
        let all = ProxyError::TooManyConnections {
            app: "lim".into(),
            which: policies::limits::ConnLimitExceeded::App,
        };
        assert!(all.to_string().contains("its max_connections"), "{all}");
        let slow = ProxyError::BodyStalled { secs: 60 };
        assert_eq!(
            (slow.status(), slow.blame()),
            (StatusCode::REQUEST_TIMEOUT, Source::Client)
        );
        assert!(slow
            .body()
            .starts_with("408 request timeout: no more of the request body arrived for 60 s"));
        let cut = ProxyError::ClientBody {
            reason: "the client closed its connection before its body ended".into(),
        };
        assert_eq!(
            (cut.status(), cut.blame()),
            (StatusCode::BAD_REQUEST, Source::Client)
        );
    }

    #[test]
    fn headers_of_refusals() {
        let r = ProxyError::RateLimited {
            app: "a".into(),
            retry_after: Duration::from_millis(1200),
        }
        .response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        let r = ProxyError::MethodNotAllowed {
            app: "a".into(),
            method: "PUT".into(),
            allow: vec!["GET".into(), "HEAD".into()],
        }
        .response();
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_secs(3)), 3);
    }
}
