//! Who may talk to the server from a browser: checks that run before the token check, on every
//! request, with or without tokens.
//!
//! - **Host** (DNS rebinding): the `Host` header must name the server: a loopback name
//!   (`localhost`, `127.0.0.0/8`, `[::1]`, any port), the listen address, or a configured host
//!   (`serve --public-url URL`, `--allowed-host HOST[:PORT]`). Otherwise 403 `host_not_allowed`.
//!   A request without `Host` (not a browser) passes; `/healthz` is exempt (it holds no data and
//!   probes use the pod address).
//! - **Origin** (cross-site requests): a state-changing request (anything but `GET`, `HEAD`,
//!   `OPTIONS`) or a WebSocket upgrade whose `Origin` header is present must come from the
//!   server's own origin (`http://` or `https://` plus the request's `Host`, or a public URL's
//!   origin) or a configured `--allowed-origin`. Otherwise 403 `origin_not_allowed`.
//! - **Content type**: a state-changing request with a body must say
//!   `Content-Type: application/json` (415 `unsupported_media_type`), except the artifact upload
//!   route, which takes raw bytes. Browsers cannot send that type cross-site without a CORS
//!   preflight, which this server never grants.

use std::net::{IpAddr, SocketAddr};

use axum::body::HttpBody as _;
use axum::extract::{MatchedPath, Request, State};
use axum::http::uri::{Authority, Uri};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// The routes that take a raw body (artifact bytes, a JUnit report).
const RAW_BODY_ROUTES: &[&str] = &[
    "/api/v1/sessions/{session}/collections/{collection}/artifacts",
    "/api/v1/tests/ingest",
];

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    /// Lower case, IPv6 without brackets.
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

/// The hosts and origins the server answers to, beyond loopback (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    hosts: Vec<HostRule>,
    /// `scheme://host[:port]`, lower case.
    origins: Vec<String>,
}

fn bare_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Guard {
    /// Loopback only.
    pub fn new() -> Guard {
        Guard::default()
    }

    /// Builds a guard from `serve`'s settings; the error names the bad value.
    pub fn from_specs<S: AsRef<str>>(
        public_urls: &[S],
        hosts: &[S],
        origins: &[S],
    ) -> Result<Guard, String> {
        let mut g = Guard::new();
        for u in public_urls {
            g.allow_public_url(u.as_ref())?;
        }
        for h in hosts {
            g.allow_host(h.as_ref())?;
        }
        for o in origins {
            g.allow_origin(o.as_ref())?;
        }
        Ok(g)
    }

    /// Allows the host of `url` (any port unless the URL names one) and its origin.
    pub fn allow_public_url(&mut self, url: &str) -> Result<(), String> {
        let shown = eks_upgrade_agent::net::redact(url);
        let bad = || format!("invalid public URL {shown:?}: expected http(s)://HOST[:PORT][/PATH]");
        let uri: Uri = url.trim().parse().map_err(|_| bad())?;
        let scheme = uri.scheme_str().ok_or_else(bad)?.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "invalid public URL {shown:?}: it must not hold credentials"
            ));
        }
        self.hosts.push(HostRule {
            host: bare_host(authority.host()),
            port: authority.port_u16(),
        });
        self.origins.push(format!(
            "{scheme}://{}",
            authority.as_str().to_ascii_lowercase()
        ));
        Ok(())
    }

    /// Allows `HOST[:PORT]` in the `Host` header (any port when none is given).
    pub fn allow_host(&mut self, spec: &str) -> Result<(), String> {
        let bad = || format!("invalid allowed host {spec:?}: expected HOST or HOST:PORT");
        let a: Authority = spec.trim().parse().map_err(|_| bad())?;
        if a.as_str().contains('@') || a.host().is_empty() {
            return Err(bad());
        }
        self.hosts.push(HostRule {
            host: bare_host(a.host()),
            port: a.port_u16(),
        });
        Ok(())
    }

    /// Allows cross-origin changes and WebSockets from `origin` (`scheme://host[:port]`).
    pub fn allow_origin(&mut self, origin: &str) -> Result<(), String> {
        let bad = || format!("invalid allowed origin {origin:?}: expected scheme://HOST[:PORT]");
        let uri: Uri = origin.trim().parse().map_err(|_| bad())?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(bad());
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad());
        }
        self.origins.push(format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            authority.as_str().to_ascii_lowercase()
        ));
        Ok(())
    }

    /// Allows the address the server listens on.
    pub fn allow_listen_addr(&mut self, addr: SocketAddr) {
        let rule = HostRule {
            host: addr.ip().to_string(),
            port: Some(addr.port()),
        };
        if !self.hosts.contains(&rule) {
            self.hosts.push(rule);
        }
    }

    /// Whether `host` (a `Host` header value) names this server.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Ok(a) = host.trim().parse::<Authority>() else {
            return false;
        };
        if a.as_str().contains('@') {
            return false;
        }
        let (name, port) = (bare_host(a.host()), a.port_u16());
        is_loopback(&name)
            || self.hosts.iter().any(|r| {
                r.host == name
                    && r.port.is_none_or(|p| {
                        port == Some(p) || (port.is_none() && (p == 80 || p == 443))
                    })
            })
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if let Some(host) = host {
            let host = host.trim().to_ascii_lowercase();
            if origin == format!("http://{host}") || origin == format!("https://{host}") {
                return true;
            }
        }
        self.origins.contains(&origin)
    }
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Response {
    ApiError::new(status, code, message).into_response()
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The middleware (see the module docs).
pub(crate) async fn check(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = match headers.get(header::HOST).map(|h| h.to_str()) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the Host header is not valid text".into(),
            );
        }
    };
    if let Some(h) = host
        && req.uri().path() != "/healthz"
        && !s.guard.host_allowed(h)
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "host {h:?} is not one this server answers to (loopback names and its listen address); if this is the name clients use, start serve with --public-url http://{h} or --allowed-host {h}"
            ),
        );
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if (changes || websocket)
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("<not text>");
        if !s.guard.origin_allowed(origin, host) {
            return refuse(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!(
                    "cross-site request from origin {origin:?} refused; if that page may change this server, start serve with --allowed-origin {origin}"
                ),
            );
        }
    }
    let raw = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| RAW_BODY_ROUTES.contains(&p.as_str()));
    if changes && !raw {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("<not text>"));
        let empty = req.body().size_hint().exact() == Some(0);
        let refused = match content_type {
            Some(ct) => !is_json(ct),
            None => !empty,
        };
        if refused {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "send the body as JSON with Content-Type: application/json (got {})",
                    content_type.map_or_else(|| "no content type".to_owned(), |c| format!("{c:?}"))
                ),
            );
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let mut g = Guard::from_specs(
            &["https://eua.example.com/base"],
            &["lan-box:8080", "10.0.0.5"],
            &[],
        )
        .unwrap();
        g.allow_listen_addr("192.168.1.2:9000".parse().unwrap());
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:8080",
            "eua.example.com",
            "eua.example.com:443",
            "lan-box:8080",
            "10.0.0.5:1",
            "192.168.1.2:9000",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "127.evil.example",
            "localhost.evil.example:8080",
            "lan-box:8081",
            "192.168.1.2:9001",
            "user@localhost",
            "",
            "[::2]",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        for bad in ["ftp://x", "not a url", "https://u:p@x"] {
            assert!(Guard::from_specs(&[bad], &[], &[]).is_err(), "{bad}");
        }
        // A refused URL's password or token is not shown.
        for (bad, shown) in [
            ("https://u:s3cr3t@x", "u:***@x"),
            ("https://s3cr3t@x", "***@x"),
            ("ftp://u:s3cr3t@x", "u:***@x"),
        ] {
            let e = Guard::from_specs(&[bad], &[], &[]).unwrap_err();
            assert!(e.contains(shown) && !e.contains("s3cr3t"), "{e}");
        }
        assert!(Guard::from_specs(&[], &["a b"], &[]).is_err());
        assert!(Guard::from_specs(&[], &[], &["https://x/path"]).is_err());
    }

    #[test]
    fn origins() {
        let g =
            Guard::from_specs(&["https://eua.example.com"], &[], &["http://tool:3000"]).unwrap();
        assert!(g.origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(g.origin_allowed("https://eua.example.com", Some("10.1.1.1")));
        assert!(g.origin_allowed("http://TOOL:3000", None));
        assert!(!g.origin_allowed("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!g.origin_allowed("null", Some("127.0.0.1:8080")));
        assert!(!g.origin_allowed("http://127.0.0.1:8081", Some("127.0.0.1:8080")));
        assert!(is_json("application/json; charset=utf-8") && !is_json("text/plain"));
    }
}
