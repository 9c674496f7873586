//! TLS to the database: a throwaway cluster with `ssl = on` and a certificate from a CA made
//! here; each `sslmode` connects or fails with a message that says what to fix.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use super::progress::{PostgresOptions, PostgresStore};
use crate::error::Error;
use crate::test_support::PgCluster;

/// A CA (its PEM) and a server certificate (PEM) and key (PEM) for `names`, signed by it.
fn ca_and_server(names: &[&str]) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("test CA {}", uuid::Uuid::now_v7()),
    );
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn options() -> PostgresOptions {
    PostgresOptions {
        pool_size: 2,
        connect_timeout: Duration::from_secs(2),
        ..PostgresOptions::default()
    }
}

fn open(url: &str) -> crate::error::Result<PostgresStore> {
    PostgresStore::open(url, &options())
}

/// The server encrypted this store's connection (`pg_stat_ssl`).
fn encrypted(store: &PostgresStore) -> bool {
    store
        .read(|db| {
            Ok(db
                .one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )?
                .get(0))
        })
        .unwrap()
}

#[test]
fn tls_modes_connect_or_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_server(&["127.0.0.1", "localhost"]);
    let (other_ca, _, _) = ca_and_server(&["127.0.0.1"]);
    let ca_path = dir.path().join("ca.pem");
    let other_path = dir.path().join("other.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    std::fs::write(&other_path, &other_ca).unwrap();
    let mut pg = PgCluster::start();
    let url = pg.create_database();
    pg.enable_tls(&cert, &key, true);
    let with = |q: &str| format!("{url}?{q}");

    // require: encrypted, certificate not checked.
    let store = open(&with("sslmode=require")).unwrap();
    assert!(encrypted(&store));
    drop(store);
    // The default (prefer) encrypts when the server offers it.
    let store = open(&url).unwrap();
    assert!(encrypted(&store));
    drop(store);
    // verify-full with the right CA, by IP address and by name.
    let ca_q = format!("sslrootcert={}", ca_path.display());
    let store = open(&with(&format!("sslmode=verify-full&{ca_q}"))).unwrap();
    assert!(encrypted(&store));
    drop(store);
    let by_name = url.replace("127.0.0.1", "localhost");
    open(&format!("{by_name}?sslmode=verify-full&{ca_q}")).unwrap();
    open(&with(&format!("sslmode=verify-ca&{ca_q}"))).unwrap();

    // A wrong CA fails, saying so (verify-full, verify-ca, and require with a CA file).
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = open(&with(&format!(
            "sslmode={mode}&sslrootcert={}",
            other_path.display()
        )))
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Backend { .. }), "{mode}: {msg}");
        assert!(msg.contains("UnknownIssuer"), "{mode}: {msg}");
        assert!(msg.contains("give the right CA file"), "{mode}: {msg}");
    }
}

#[test]
fn a_certificate_for_another_host_fails_verify_full_but_passes_verify_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_server(&["db.example.internal"]);
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let mut pg = PgCluster::start();
    let url = pg.create_database();
    pg.enable_tls(&cert, &key, false);
    let ca_q = format!("sslrootcert={}", ca_path.display());
    let msg = open(&format!("{url}?sslmode=verify-full&{ca_q}"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not valid for name"), "{msg}");
    assert!(
        msg.contains("connect by a name in the certificate"),
        "{msg}"
    );
    let store = open(&format!("{url}?sslmode=verify-ca&{ca_q}")).unwrap();
    assert!(encrypted(&store));
    drop(store);
    // Not refused without TLS here: disable connects in the clear.
    let store = open(&format!("{url}?sslmode=disable")).unwrap();
    assert!(!encrypted(&store));
}

#[test]
fn sslmode_disable_against_a_server_that_requires_tls_fails_clearly() {
    let (_, cert, key) = ca_and_server(&["127.0.0.1"]);
    let mut pg = PgCluster::start();
    let url = pg.create_database();
    pg.enable_tls(&cert, &key, true);
    let msg = open(&format!("{url}?sslmode=disable"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no encryption"), "{msg}");
    assert!(msg.contains("use sslmode=require or verify-full"), "{msg}");
}

#[test]
fn bad_tls_options_say_what_to_fix_and_connect_nowhere() {
    for (q, want) in [
        (
            "sslmode=verify",
            "use disable, prefer, require, verify-ca or verify-full",
        ),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "cannot read sslrootcert /nonexistent/ca.pem",
        ),
    ] {
        // Port 9 on loopback: nothing is contacted, the URL is refused first.
        let err = open(&format!("postgres://u:secret@127.0.0.1:9/db?{q}")).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{q}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(want), "{q}: {msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = open(&format!(
        "postgres://u@127.0.0.1:9/db?sslmode=verify-ca&sslrootcert={}",
        empty.display()
    ))
    .unwrap_err();
    assert!(err.to_string().contains("holds no CA certificate"), "{err}");
}
