//! URL checks shared by every client of a remote endpoint (S3, EventBridge, OTLP): plain
//! http is only for this machine.

/// Whether `url` points at this machine, decided on the host of the parsed URL (as the HTTP
/// client will parse it): `localhost`, `127.0.0.0/8` or `::1`. Anything else, including names
/// that merely start with `127.` or `localhost` and URLs with user info, is not loopback.
pub(crate) fn is_loopback(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return false;
    }
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
