//! Connecting to PostgreSQL: the options, the database URL (libpq's options; passwords
//! never shown), TLS, and the pool of connections, each with its prepared statements.
//!
//! TLS follows libpq's `sslmode` (rustls underneath): `disable` never encrypts; `prefer` (the
//! default) encrypts when the server offers it, without checking its certificate; `require`
//! always encrypts, and checks the certificate's CA only when `sslrootcert` is given (as
//! libpq does); `verify-ca` checks that a CA in `sslrootcert` signed the server's certificate;
//! `verify-full` also checks that the URL's host is a name in it. `sslrootcert` is a PEM file
//! of CA certificates, or `system` for the operating system's trust store (the default of the
//! verify modes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement};
use r2d2_postgres::r2d2;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// Options for opening a [`PostgresStore`](super::progress::PostgresStore).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections the pool holds.
    pub pool_size: u32,
    /// How long taking a connection from the pool (or making one) may wait.
    pub connect_timeout: Duration,
    /// How long a claim on work (a notification delivery) lasts before another replica may
    /// take it over; renewed while the work lasts.
    pub lease: Duration,
    /// How long a `store copy` into this database waits for the locks it takes on the copied
    /// tables while other sessions (a server, a transaction left open) hold conflicting ones;
    /// past it the copy fails saying so, and nothing is copied.
    pub copy_lock_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            lease: super::outbox::LEASE,
            copy_lock_timeout: Duration::from_secs(10),
        }
    }
}

/// One pooled connection with its prepared statements.
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(super) stmts: HashMap<String, Statement>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("statements", &self.stmts.len())
            .finish()
    }
}

/// The connection pool of a [`PostgresStore`](super::PostgresStore), safe to drop anywhere.
///
/// Each `postgres::Client` drives its connection on a runtime of its own and blocks on it to
/// close; on a thread that drives an async runtime (a tokio worker, a `#[tokio::test]`, any
/// async task holding the last `Arc` of a store: server state, hub, dispatcher, uploader,
/// stream) that panics ("cannot start a runtime from within a runtime"), and a panic in a drop
/// aborts. So the pool's last handle is dropped on a thread of its own (`eua-pg-close`),
/// joined: the connections are closed when the store's drop returns, wherever it ran.
pub(crate) struct Pool(Option<r2d2::Pool<Manager>>);

impl Pool {
    pub(crate) fn new(pool: r2d2::Pool<Manager>) -> Pool {
        Pool(Some(pool))
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl std::ops::Deref for Pool {
    type Target = r2d2::Pool<Manager>;

    fn deref(&self) -> &Self::Target {
        // Only `drop` takes it.
        self.0.as_ref().expect("the pool is there until drop")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let Some(pool) = self.0.take() else { return };
        match std::thread::Builder::new()
            .name("eua-pg-close".into())
            .spawn(move || drop(pool))
        {
            Ok(closer) => {
                if closer.join().is_err() {
                    tracing::warn!("closing the database connections failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to close the database connections")
            }
        }
    }
}

/// Makes [`Conn`]s for the pool.
#[derive(Debug)]
pub(crate) struct Manager {
    pub(super) config: postgres::Config,
    pub(super) tls: Tls,
    /// Why the last connection attempt failed, with its causes (the pool keeps only the
    /// outermost message, which for TLS says nothing).
    pub(super) last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Manager {
    pub(super) fn new(config: postgres::Config, tls: Tls) -> Manager {
        Manager {
            config,
            tls,
            last_error: Arc::new(std::sync::Mutex::new(None)),
        }
    }
}

/// `e` and its causes, `: `-separated (each once).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// How connections are encrypted (from the URL's `sslmode` and `sslrootcert`).
#[derive(Clone)]
pub(crate) enum Tls {
    /// `sslmode=disable`.
    Off,
    /// rustls with the verifier the mode asks for.
    On(MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Off => "Tls::Off",
            Tls::On(_) => "Tls::On",
        })
    }
}

impl Tls {
    /// Opens one connection with `config`.
    pub(crate) fn connect(
        &self,
        config: &postgres::Config,
    ) -> std::result::Result<Client, postgres::Error> {
        match self {
            Tls::Off => config.connect(NoTls),
            Tls::On(tls) => config.connect(tls.clone()),
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Conn, postgres::Error> {
        let client = self.tls.connect(&self.config).inspect_err(|e| {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(chain(e));
            }
        })?;
        Ok(Conn {
            client,
            stmts: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        conn.client.simple_query("")?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

/// A client (or transaction) with the connection's statement cache.
pub(crate) struct Db<'a, C: GenericClient> {
    pub(crate) c: &'a mut C,
    pub(super) stmts: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> Db<'_, C> {
    fn stmt(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        if self.stmts.len() >= 256 {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(crate) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let s = self.stmt(sql)?;
        Ok(self.c.query(&s, params)?)
    }

    pub(crate) fn opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_opt(&s, params)?)
    }

    pub(crate) fn one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_one(&s, params)?)
    }

    pub(crate) fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let s = self.stmt(sql)?;
        Ok(self.c.execute(&s, params)?)
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.c.batch_execute(sql)?)
    }
}

pub(crate) type Tx<'a, 'c> = Db<'a, postgres::Transaction<'c>>;

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // libpq also takes the password (and an SSL key's passphrase) as query options.
            if u.query_pairs().any(|(k, _)| secret_option(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret_option(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparsable database URL)".to_owned(),
    }
}

/// Query options of a database URL that carry secrets.
fn secret_option(key: &str) -> bool {
    matches!(key, "password" | "sslpassword")
}

/// A parsed database URL: the client's settings and how it encrypts.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) config: postgres::Config,
    pub(crate) tls: Tls,
}

/// `sslmode` values (libpq's, but `allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Parses a `postgres://` URL (libpq's options: `sslmode`, `sslrootcert`, `connect_timeout`,
/// `application_name`, ...); a bad one is `InvalidInput` saying what to fix.
pub fn parse_url(url: &str) -> Result<postgres::Config> {
    Ok(parse_target(url)?.config)
}

/// [`parse_url`] with the TLS connector the URL asks for (its CA file read).
pub(crate) fn parse_target(url: &str) -> Result<Target> {
    let shown = redact(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Error::invalid(format!(
            "invalid database URL {shown}: expected postgres://user:password@host:port/database"
        )));
    }
    // `sslmode` and `sslrootcert` are ours (the client library knows fewer modes and no CA
    // file); the rest goes to the client library as it is.
    let (rest, mode, rootcert) = take_tls_options(url)
        .map_err(|e| Error::invalid(format!("invalid database URL {shown}: {e}")))?;
    let mut config: postgres::Config = rest.parse().map_err(|e| {
        Error::invalid(format!(
            "invalid database URL {shown}: {e} (expected postgres://user:password@host:port/database)"
        ))
    })?;
    if config.get_application_name().is_none() {
        config.application_name("eks-upgrade-agent");
    }
    config.ssl_mode(match mode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        SslMode::Prefer => postgres::config::SslMode::Prefer,
        _ => postgres::config::SslMode::Require,
    });
    let tls = tls_for(mode, rootcert.as_deref())
        .map_err(|e| Error::invalid(format!("database URL {shown}: {e}")))?;
    Ok(Target { config, tls })
}

/// Splits `sslmode` and `sslrootcert` off `url`'s query.
fn take_tls_options(url: &str) -> std::result::Result<(String, SslMode, Option<String>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), SslMode::Prefer, None));
    };
    let mut mode = SslMode::Prefer;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let value = url::form_urlencoded::parse(format!("v={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        match k {
            "sslmode" => {
                mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "unknown sslmode {other:?}: use disable, prefer, require, verify-ca \
                             or verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => rootcert = Some(value),
            _ => kept.push(part),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, rootcert))
}

/// The connector for `mode`, trusting the CAs of `rootcert` (a PEM file, or `system`).
fn tls_for(mode: SslMode, rootcert: Option<&str>) -> std::result::Result<Tls, String> {
    // The AWS SDK's crypto when it is linked anyway (a second provider would cost binary
    // size), else ring.
    #[cfg(feature = "aws")]
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    #[cfg(not(feature = "aws"))]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    // libpq: `require` with a CA file verifies like `verify-ca`.
    let mode = match (mode, rootcert) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let config = match mode {
        SslMode::Disable => return Ok(Tls::Off),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(rootcert.unwrap_or("system"))?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| format!("cannot use the CA certificates of sslrootcert: {e}"))?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(Tls::On(MakeRustlsConnect::new(config)))
}

/// The CA certificates of `rootcert`: a PEM file, or `system`.
fn root_store(rootcert: &str) -> std::result::Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if rootcert == "system" {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err("sslrootcert=system: the system has no CA certificates; give \
                        sslrootcert=PATH (a PEM file of the CA that signed the server's certificate)"
                .to_owned());
        }
        return Ok(roots);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(rootcert)
        .and_then(|it| it.collect())
        .map_err(|e| {
            format!(
                "cannot read sslrootcert {rootcert}: {e} (expected a PEM file of CA certificates)"
            )
        })?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {rootcert} holds no CA certificate (expected PEM \
             -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    Ok(roots)
}

/// `sslmode=prefer|require` without a CA: encrypted, the certificate not checked (libpq's
/// behaviour), the handshake's signatures still are.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What to fix when connecting failed with `cause` (a TLS or `pg_hba.conf` refusal), or "".
pub(crate) fn connect_hint(cause: &str) -> &'static str {
    if cause.contains("not valid for name") || cause.contains("NotValidForName") {
        " (the server's certificate is not for the URL's host: connect by a name in the \
         certificate, or use sslmode=verify-ca)"
    } else if cause.contains("certificate") || cause.contains("UnknownIssuer") {
        " (the server's certificate is not signed by a CA of sslrootcert: give the right CA \
         file, e.g. sslrootcert=/path/ca.pem)"
    } else if cause.contains("no encryption") {
        " (the server only accepts TLS connections: use sslmode=require or verify-full)"
    } else if cause.contains("server does not support TLS") {
        " (the server does not offer TLS: enable ssl on the server, or use sslmode=prefer)"
    } else {
        ""
    }
}
