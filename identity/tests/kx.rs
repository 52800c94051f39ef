//! Key exchange on Membrane's mutual-TLS configurations: hybrid post-quantum when both sides
//! have it, X25519 with a classical peer unless post-quantum is required, and no handshake
//! at all when one side requires what the other lacks.

mod common;

use common::handshake::Pair;
use membrane_identity::KeyExchange;

fn handshake(client: KeyExchange, server: KeyExchange) -> Result<String, rustls::Error> {
    Pair::new(client, server).handshake()
}

#[test]
fn two_membrane_peers_agree_on_x25519mlkem768() {
    assert_eq!(
        handshake(KeyExchange::PqPreferred, KeyExchange::PqPreferred).expect("handshake"),
        "X25519MLKEM768"
    );
    assert_eq!(
        handshake(KeyExchange::PqOnly, KeyExchange::PqPreferred).expect("handshake"),
        "X25519MLKEM768"
    );
}

#[test]
fn a_classical_peer_gets_x25519_unless_post_quantum_is_required() {
    assert_eq!(
        handshake(KeyExchange::Classical, KeyExchange::PqPreferred).expect("handshake"),
        "X25519"
    );
    assert_eq!(
        handshake(KeyExchange::PqPreferred, KeyExchange::Classical).expect("handshake"),
        "X25519"
    );
    let refused = handshake(KeyExchange::Classical, KeyExchange::PqOnly).expect_err("refused");
    assert!(
        refused.to_string().contains("NoKxGroupsInCommon"),
        "{refused}"
    );
    handshake(KeyExchange::PqOnly, KeyExchange::Classical).expect_err("refused by the client");
}

#[test]
fn the_process_choice_is_fixed_once() {
    // This test binary never set it: the default is post-quantum first.
    assert_eq!(membrane_identity::key_exchange(), KeyExchange::PqPreferred);
    assert!(membrane_identity::set_key_exchange(
        KeyExchange::PqPreferred
    ));
    assert!(!membrane_identity::set_key_exchange(KeyExchange::Classical));
    let names: Vec<String> = membrane_identity::crypto_provider()
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(names[0], "X25519MLKEM768");
}
