//! Tests of the certificate manager against a scripted controller: renewal ahead of expiry,
//! a failing controller until expiry, recovery, forgetting, and the slot state machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{TrustBundle, crypto_provider};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;

const ID: &str = "spiffe://cluster.local/ns/ml/sa/trainer";

/// A stand-in controller: signs leaves of `lifetime`, or fails while down.
struct FakeCa {
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    lifetime: Duration,
    up: AtomicBool,
    calls: AtomicUsize,
}

impl std::fmt::Debug for FakeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCa").finish_non_exhaustive()
    }
}

impl FakeCa {
    fn new(lifetime: Duration) -> Arc<Self> {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).expect("root");
        Arc::new(Self {
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
            lifetime,
            up: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
        })
    }

    fn bundle(&self) -> SharedTrustBundle {
        let td = parse_trust_domain("cluster.local").expect("td");
        SharedTrustBundle::new(TrustBundle::new(td, [self.root.clone()]).expect("bundle"))
    }

    fn sign(&self, identity: &WorkloadIdentity) -> WorkloadSvid {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity.to_string();
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().expect("uri"))];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(1);
        params.not_after = now + self.lifetime;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadSvid::new(vec![cert.der().clone()], key, &crypto_provider()).expect("svid")
    }
}

impl SvidSource for FakeCa {
    fn issue<'a>(
        &'a self,
        identity: &'a WorkloadIdentity,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CertError>> + Send + 'a>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = if self.up.load(Ordering::SeqCst) {
            Ok(Issued {
                svid: self.sign(identity),
                refresh_at: None,
            })
        } else {
            Err(CertError::Connect("controller down".into()))
        };
        Box::pin(async move { result })
    }
}

fn identity() -> WorkloadIdentity {
    WorkloadIdentity::from_spiffe_id(ID.parse().expect("id")).expect("identity")
}

fn manager(ca: &Arc<FakeCa>) -> Arc<CertificateManager> {
    Arc::new(CertificateManager::with_source(ca.clone(), ca.bundle()))
}

async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn renews_ahead_of_expiry_without_blocking_callers() {
    let ca = FakeCa::new(Duration::from_secs(3));
    let certs = manager(&ca);
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(certs.run_renewals(stop.clone()));
    let first = certs.svid(&identity()).await.expect("issued");
    // Cached: no second call.
    let again = certs.svid(&identity()).await.expect("cached");
    assert_eq!(first.info().serial, again.info().serial);
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    let planned = certs.status()[0].next_renewal_unix_ms.expect("planned");
    let renewed = eventually(Duration::from_secs(4), || {
        certs.metrics().renewals(true) >= 1
    })
    .await;
    assert!(renewed, "renewed in the background: {:?}", certs.status());
    assert!(unix_ms(SystemTime::now()) >= planned);
    let next = certs.svid(&identity()).await.expect("renewed");
    assert_ne!(next.info().serial, first.info().serial);
    assert!(next.info().not_after > first.info().not_after);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), scheduler)
        .await
        .expect("scheduler stops")
        .expect("no panic");
}

#[tokio::test]
async fn a_failing_controller_keeps_the_valid_certificate_then_expiry_is_an_error() {
    let ca = FakeCa::new(Duration::from_secs(2));
    let certs = manager(&ca);
    let stop = CancellationToken::new();
    let _scheduler = tokio::spawn(certs.run_renewals(stop.clone()));
    let first = certs.svid(&identity()).await.expect("issued");
    ca.up.store(false, Ordering::SeqCst);
    // Renewal attempts fail; the valid certificate is still served meanwhile.
    assert!(
        eventually(Duration::from_secs(3), || certs.metrics().renewals(false)
            >= 1)
        .await,
        "renewal attempted"
    );
    if first.is_valid_at(SystemTime::now()) {
        let served = certs.svid(&identity()).await.expect("still valid");
        assert_eq!(served.info().serial, first.info().serial);
    }
    // After expiry: a typed error, never the expired certificate.
    let until_expiry = until(first.info().not_after, SystemTime::now());
    tokio::time::sleep(until_expiry + Duration::from_millis(1100)).await;
    let err = certs.svid(&identity()).await.expect_err("expired");
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("expired") && message.contains("controller down"),
        "{message}"
    );
    let status = &certs.status()[0];
    assert!(status.expired && status.renewal_failures >= 2, "{status:?}");
    // The issuance, then retries closer together as expiry neared.
    assert!(ca.calls.load(Ordering::SeqCst) >= 3);
    // The controller is back: recovery without a restart.
    ca.up.store(true, Ordering::SeqCst);
    let recovered = eventually(Duration::from_secs(6), || {
        certs.status()[0].serial.as_deref() != Some(first.info().serial.as_str())
    })
    .await;
    assert!(recovered, "scheduler recovers: {:?}", certs.status());
    let svid = certs.svid(&identity()).await.expect("recovered");
    assert!(svid.is_valid_at(SystemTime::now()));
    stop.cancel();
}

#[tokio::test]
async fn a_caller_recovers_an_expired_certificate_itself() {
    let ca = FakeCa::new(Duration::from_secs(2));
    let certs = manager(&ca);
    // No scheduler: only callers ask.
    let first = certs.svid(&identity()).await.expect("issued");
    ca.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(
        until(first.info().not_after, SystemTime::now()) + Duration::from_millis(50),
    )
    .await;
    let calls = ca.calls.load(Ordering::SeqCst);
    let err = certs.svid(&identity()).await.expect_err("expired");
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
    // A second caller right after does not ask again (the controller was just down).
    let err = certs.svid(&identity()).await.expect_err("still expired");
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
    assert_eq!(ca.calls.load(Ordering::SeqCst), calls + 1);
    ca.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(FAIL_FAST).await;
    let svid = certs.svid(&identity()).await.expect("recovered");
    assert_ne!(svid.info().serial, first.info().serial);
}

#[tokio::test]
async fn forgetting_an_identity_stops_its_renewals() {
    let ca = FakeCa::new(Duration::from_secs(1));
    let certs = manager(&ca);
    let stop = CancellationToken::new();
    let _scheduler = tokio::spawn(certs.run_renewals(stop.clone()));
    certs.svid(&identity()).await.expect("issued");
    certs.forget(&identity());
    assert!(certs.status().is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        1,
        "no renewal after forget"
    );
    stop.cancel();
}

#[test]
fn slot_state_plans_and_backs_off() {
    let ca = FakeCa::new(Duration::from_secs(100));
    let now = SystemTime::now();
    let mut state = SlotState::default();
    assert!(!state.due(now));
    let svid = ca.sign(&identity());
    let not_after = svid.info().not_after;
    assert!(
        state
            .succeeded(
                Issued {
                    svid,
                    refresh_at: None
                },
                now,
                0.0
            )
            .is_none()
    );
    let planned = state.next_attempt.expect("planned");
    let half = now + until(not_after, now) / 2;
    assert!(planned.duration_since(half).unwrap_or_default() < Duration::from_millis(1));
    // Failures double the delay, capped by a quarter of the time left.
    let mut delays = Vec::new();
    for _ in 0..6 {
        state.failed(CertError::Connect("down".into()), now);
        delays.push(until(state.next_attempt.expect("retry"), now).as_secs());
    }
    assert_eq!(delays[..5], [1, 2, 4, 8, 16]);
    assert!(
        matches!(delays[5], 24 | 25),
        "capped at a quarter of ~100 s: {delays:?}"
    );
    assert!(state.valid(now).is_some(), "still valid");
    assert!(state.recently_unreachable(now));
    assert!(!state.recently_unreachable(now + FAIL_FAST));
    // After expiry: the typed error.
    let later = not_after + Duration::from_secs(1);
    assert!(state.valid(later).is_none());
    let err = state.unavailable(&identity(), later);
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
}
