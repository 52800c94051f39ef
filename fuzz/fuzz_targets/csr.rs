//! The CA's CSR gate: `ValidatedCsr::parse` never panics on any bytes, and every CSR it
//! accepts can be signed.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use membrane_ca::{Signer, SignerConfig, SigningAuthority};
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{TrustDomain, ValidatedCsr};

struct Ca {
    trust_domain: TrustDomain,
    signer: Signer,
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let trust_domain = parse_trust_domain("cluster.local").expect("valid trust domain");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir: PathBuf =
            std::env::temp_dir().join(format!("membrane-fuzz-csr-{}-{nanos}", std::process::id()));
        let authority =
            SigningAuthority::load_or_create(&dir, &trust_domain, Duration::from_secs(3600))
                .expect("create a signing authority");
        // The authority lives in memory from here on; do not leave key material behind.
        let _ = std::fs::remove_dir_all(&dir);
        Ca {
            trust_domain,
            signer: Signer::new(authority, SignerConfig::default()),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let ca = ca();
    let Ok(csr) = ValidatedCsr::parse(data, &ca.trust_domain) else {
        return;
    };
    assert_eq!(csr.identity().trust_domain(), &ca.trust_domain);
    let svid = ca
        .signer
        .sign(&csr, Duration::from_secs(60))
        .expect("an accepted CSR must be signable");
    assert!(!svid.chain.is_empty());
});
