//! URL checks shared by every client of a remote endpoint (S3, EventBridge, OTLP, webhooks,
//! servers): plain http is only for this machine (webhooks: only without credentials), and a
//! URL's password never reaches a message or a log ([`redact`]).

/// Whether `url` points at this machine, decided on the host of the parsed URL (as the HTTP
/// client will parse it): `localhost`, `127.0.0.0/8` or `::1`. Anything else, including names
/// that merely start with `127.` or `localhost` (`http://127.0.0.1@evil.example` is a host
/// `evil.example` with user info `127.0.0.1`), is not loopback. User info does not change the
/// host: `http://user:pw@127.0.0.1/` is loopback.
pub(crate) fn is_loopback(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Whether `url` uses plain http (any case).
pub(crate) fn is_plain_http(url: &str) -> bool {
    url.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

/// Whether `url` carries user info (`user[:password]@`).
pub(crate) fn has_credentials(url: &str) -> bool {
    userinfo_span(url).is_some()
}

/// Where the user info of `url` sits: the byte range of `user[:password]`, before the last `@`
/// of the authority (the text after `://`, or from the start without a scheme, up to the
/// first `/`, `?` or `#`). Works on any text, parsable or not, so that an error about a
/// malformed URL can still hide its password.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((start, start + at))
}

/// `url` with the password of its user info replaced by `***` (`https://user:***@host/`), for
/// messages and logs; a lone user info (`https://TOKEN@host/`, often a token) is replaced
/// whole (`https://***@host/`). The rest is kept as given; a URL without user info is
/// returned as is.
pub fn redact(url: &str) -> String {
    match userinfo_span(url) {
        Some((start, end)) => match url[start..end].find(':') {
            Some(colon) => format!("{}***{}", &url[..start + colon + 1], &url[end..]),
            None => format!("{}***{}", &url[..start], &url[end..]),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_the_rest_is_kept() {
        for (given, shown) in [
            (
                "http://user:pw@127.0.0.1:9/x",
                "http://user:***@127.0.0.1:9/x",
            ),
            (
                "https://u:s3cr3t@hooks.example.com/a@b?c=d",
                "https://u:***@hooks.example.com/a@b?c=d",
            ),
            ("https://u:p:q@h/", "https://u:***@h/"),
            ("https://a@b:c@h:1/", "https://a@b:***@h:1/"),
            ("http://only-token@h/", "http://***@h/"),
            ("https://ghp_T0KEN@h:1/x@y", "https://***@h:1/x@y"),
            ("https://h.example/x", "https://h.example/x"),
            // Unparsable, still hidden.
            ("http://u:s3cr3t@[bad/", "http://u:***@[bad/"),
            ("u:pw@h:1/x", "u:***@h:1/x"),
            ("", ""),
        ] {
            assert_eq!(redact(given), shown, "{given}");
        }
        assert!(has_credentials("http://u@h/"));
        assert!(has_credentials("http://u:p@h/"));
        assert!(!has_credentials("http://h/a@b"));
        assert!(!has_credentials("http://h?x=a@b"));
    }
}
