//! Bearer tokens with roles.
//!
//! A token is given as `TOKEN:ROLE` with `ROLE` `read` or `write` (`write` may also read).
//! Requests carry it as `Authorization: Bearer TOKEN`, or as `?access_token=TOKEN` where a
//! header cannot be set (browser WebSockets, download links). `GET`/`HEAD` need `read`,
//! everything else `write`. With no tokens configured every request is allowed (the server then
//! listens on loopback only; see `eks-upgrade-agent serve`). `/healthz` and the dashboard's
//! static files are always open: they hold no data.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every configured token.

use std::collections::HashMap;

use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read progress, events, artifacts; watch streams and the dashboard.
    Read,
    /// Everything `read` may, plus every change.
    Write,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            other => Err(format!("unknown role {other:?}: expected read or write")),
        }
    }
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Vec<([u8; 32], Role)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl Auth {
    /// No tokens: every request is allowed.
    pub fn open() -> Auth {
        Auth::default()
    }

    /// Parses `TOKEN:ROLE` specs (the flag, `EUA_TOKENS` items, config-file entries).
    pub fn from_specs<S: AsRef<str>>(specs: &[S]) -> Result<Auth, String> {
        let mut auth = Auth::default();
        for spec in specs {
            let spec = spec.as_ref().trim();
            let (token, role) = spec.rsplit_once(':').ok_or_else(|| {
                "a token must be given as TOKEN:ROLE with ROLE read or write".to_owned()
            })?;
            let role: Role = role.parse()?;
            auth.add(token, role)?;
        }
        Ok(auth)
    }

    /// Adds one token.
    pub fn add(&mut self, token: &str, role: Role) -> Result<(), String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "a token must be at least {MIN_TOKEN_LEN} characters (got {})",
                token.len()
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a token must not contain spaces or control characters".into());
        }
        self.tokens
            .push((Sha256::digest(token.as_bytes()).into(), role));
        Ok(())
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The role of `token`, if it is one of ours (constant time in the token's content).
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (t, role) in &self.tokens {
            if bool::from(t.ct_eq(&digest)) {
                found = found.max(Some(*role));
            }
        }
        found
    }
}

fn token_of(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let q: Query<HashMap<String, String>> = Query::try_from_uri(req.uri()).ok()?;
    q.0.get("access_token").cloned()
}

fn open_path(path: &str) -> bool {
    path == "/healthz" || path == "/" || path == "/favicon.ico" || path.starts_with("/assets/")
}

/// The middleware: checks the token and the role the method needs.
pub(crate) async fn require(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if !s.auth.enabled() || open_path(req.uri().path()) {
        return next.run(req).await;
    }
    let need = if matches!(*req.method(), Method::GET | Method::HEAD) {
        Role::Read
    } else {
        Role::Write
    };
    let unauthorized = |m: &str| {
        let mut r =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_owned()).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    };
    let Some(token) = token_of(&req) else {
        return unauthorized(
            "missing token: send Authorization: Bearer TOKEN (or ?access_token=TOKEN)",
        );
    };
    match s.auth.role_of(&token) {
        None => unauthorized("invalid token"),
        Some(role) if role < need => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read; changes need a write token",
        )
        .into_response(),
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_roles_match() {
        let a = Auth::from_specs(&["aaaaaaaaaaaaaaaa:read", "bbbbbbbbbbbbbbbb:write"]).unwrap();
        assert!(a.enabled());
        assert_eq!(a.role_of("aaaaaaaaaaaaaaaa"), Some(Role::Read));
        assert_eq!(a.role_of("bbbbbbbbbbbbbbbb"), Some(Role::Write));
        assert_eq!(a.role_of("aaaaaaaaaaaaaaab"), None);
        assert_eq!(a.role_of(""), None);
        // A token may contain ':'; the role is after the last one.
        let a = Auth::from_specs(&["a:b:c:d:e:f:g:h:i:j:read"]).unwrap();
        assert_eq!(a.role_of("a:b:c:d:e:f:g:h:i:j"), Some(Role::Read));
    }

    /// Only the SHA-256 digest of a token is kept (compared with `ct_eq`), and `Debug` shows
    /// how many tokens there are, never one of them.
    #[test]
    fn only_digests_of_tokens_are_kept() {
        let a = Auth::from_specs(&["secret-token-0123456789:write"]).unwrap();
        let digest: [u8; 32] = Sha256::digest(b"secret-token-0123456789").into();
        assert_eq!(a.tokens, [(digest, Role::Write)]);
        let shown = format!("{a:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "Auth { tokens: 1 }");
    }

    #[test]
    fn bad_specs_are_refused() {
        for (spec, want) in [
            ("aaaaaaaaaaaaaaaa", "TOKEN:ROLE"),
            ("aaaaaaaaaaaaaaaa:admin", "unknown role"),
            ("short:read", "at least 16"),
            ("aaaaaaaa aaaaaaaa:read", "spaces"),
        ] {
            let e = Auth::from_specs(&[spec]).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
        assert!(!Auth::open().enabled());
    }
}
