//! Records sealed and opened by both AEAD implementations: round trips, tampering, inner
//! types, the sealing paths' equivalence (also over a reused send buffer), opening to an
//! earlier place, the last sequence number.

use super::*;
use crate::hbone::send_buf::SendBuf;
use rustls::crypto::cipher::AeadKey;

fn key(seq: u64) -> RecordKey {
    let secrets = ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7u8; 32]),
        iv: Iv::new([9u8; 12]),
    };
    RecordKey::new(seq, secrets).expect("key")
}

fn split(record: &[u8]) -> ([u8; HEADER_LEN], &[u8]) {
    let header: [u8; HEADER_LEN] = record[..HEADER_LEN].try_into().expect("header");
    assert_eq!(body_len(&header).expect("len"), record.len() - HEADER_LEN);
    (header, &record[HEADER_LEN..])
}

#[test]
fn sealed_records_open_both_ways() {
    let (mut tx, mut rx) = (key(5), key(5));
    let mut wire = Vec::new();
    tx.seal(Content::ApplicationData, b"hello", &mut wire)
        .expect("seal");
    let start = wire.len();
    wire.extend_from_slice(&[0; HEADER_LEN]);
    wire.extend_from_slice(b"staged bytes");
    tx.seal_staged(Content::Handshake, &mut wire, start)
        .expect("seal staged");
    assert_eq!(tx.seq(), 7);

    let (header, body) = split(&wire[..start]);
    let mut body = body.to_vec();
    assert_eq!(
        rx.open_in_place(&header, &mut body).expect("open"),
        (Content::ApplicationData, 5)
    );
    assert_eq!(&body[..5], b"hello");
    let (header, body) = split(&wire[start..]);
    let mut body = body.to_vec();
    let (content, len) = rx.open_in_place(&header, &mut body).expect("open");
    assert_eq!(
        (content, &body[..len]),
        (Content::Handshake, &b"staged bytes"[..])
    );
}

#[test]
fn a_flipped_bit_or_a_wrong_sequence_is_refused() {
    let mut tx = key(0);
    let mut wire = Vec::new();
    tx.seal(Content::ApplicationData, b"payload", &mut wire)
        .expect("seal");
    for at in [0, 3, HEADER_LEN, wire.len() - 1] {
        let mut bad = wire.clone();
        bad[at] ^= 1;
        let header: [u8; HEADER_LEN] = bad[..HEADER_LEN].try_into().expect("header");
        let mut body = bad[HEADER_LEN..].to_vec();
        // A changed type byte is refused by the header check, anything else by the tag.
        let refused = body_len(&header)
            .and_then(|_| key(0).open_in_place(&header, &mut body))
            .expect_err("tampered");
        assert!(
            matches!(refused, RecordError::BadMac | RecordError::OuterType(_)),
            "{refused:?}"
        );
    }
    let header: [u8; HEADER_LEN] = wire[..HEADER_LEN].try_into().expect("header");
    let mut body = wire[HEADER_LEN..].to_vec();
    assert_eq!(
        key(1).open_in_place(&header, &mut body),
        Err(RecordError::BadMac),
        "replayed under another sequence number"
    );
}

#[test]
fn headers_and_inner_types_are_checked() {
    assert_eq!(
        body_len(&[22, 3, 3, 0, 40]),
        Err(RecordError::OuterType(22))
    );
    assert_eq!(body_len(&[20, 3, 3, 0, 1]), Err(RecordError::OuterType(20)));
    assert_eq!(
        body_len(&[23, 3, 3, 0x41, 0x01]),
        Err(RecordError::Overflow(0x4101))
    );
    assert_eq!(body_len(&[23, 3, 3, 0, 16]), Err(RecordError::BadMac));
    assert_eq!(body_len(&[23, 3, 3, 0x41, 0]), Ok(MAX_CIPHERTEXT));
    assert_eq!(inner(&[1, 2, 23, 0, 0]), Ok((Content::ApplicationData, 2)));
    assert_eq!(inner(&[0, 0, 0]), Err(RecordError::InnerType));
    assert_eq!(inner(&[1, 20]), Err(RecordError::InnerType));
    let mut too_long = vec![1; MAX_PLAINTEXT + 1];
    too_long.push(23);
    assert_eq!(
        inner(&too_long),
        Err(RecordError::Overflow(MAX_PLAINTEXT + 2))
    );
    // A full record's content with padding after its type byte is over RFC 8446's bound too.
    let padded = [vec![1; MAX_PLAINTEXT], vec![23], vec![0; 100]].concat();
    assert_eq!(
        inner(&padded),
        Err(RecordError::Overflow(MAX_PLAINTEXT + 101))
    );
    let full = [vec![1; MAX_PLAINTEXT], vec![23]].concat();
    assert_eq!(inner(&full), Ok((Content::ApplicationData, MAX_PLAINTEXT)));
    let short_padded = [vec![1; 100], vec![23], vec![0; 200]].concat();
    assert_eq!(inner(&short_padded), Ok((Content::ApplicationData, 100)));
}

/// The same key material in both AEAD suites of 256-bit keys.
fn suites(key: u8, iv: u8) -> [ConnectionTrafficSecrets; 2] {
    [
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([key; 32]),
            iv: Iv::new([iv; 12]),
        },
        ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([key; 32]),
            iv: Iv::new([iv; 12]),
        },
    ]
}

#[test]
fn both_implementations_read_each_other() {
    // (rustls builds 16-byte AES-128 keys only inside itself; that suite takes the same
    // code path with the other algorithm constant.)
    let suites = || suites(3, 4);
    let message = vec![0x42u8; MAX_PLAINTEXT];
    for (a, b) in [
        (Implementation::AwsLc, Implementation::Ring),
        (Implementation::Ring, Implementation::AwsLc),
    ] {
        for (tx, rx) in suites().into_iter().zip(suites()) {
            let mut tx = RecordKey::with(a, 11, tx).expect("sealing key");
            let mut rx = RecordKey::with(b, 11, rx).expect("opening key");
            let mut wire = Vec::new();
            tx.seal(Content::ApplicationData, &message, &mut wire)
                .expect("seal");
            let (header, body) = split(&wire);
            let mut body = body.to_vec();
            let (content, len) = rx.open_in_place(&header, &mut body).expect("open");
            assert_eq!(content, Content::ApplicationData);
            assert!(body[..len] == message[..], "{a:?} -> {b:?}");
        }
    }
    let (aws_lc, ring) = calibrate();
    assert!(
        aws_lc < Duration::MAX && ring < Duration::MAX,
        "both measured"
    );
}

#[test]
fn sealing_from_the_plaintext_and_in_place_give_the_same_record() {
    // aws-lc's full records are sealed from where the plaintext lies, staged ones in
    // place; ring's go through `Aead::seal_into` only here. The bytes must not differ.
    let message: Vec<u8> = (0..MAX_PLAINTEXT).map(|i| (i * 13) as u8).collect();
    for which in [Implementation::AwsLc, Implementation::Ring] {
        for (one, two) in suites(8, 9).into_iter().zip(suites(8, 9)) {
            let mut from = RecordKey::with(which, 3, one).expect("key");
            let mut staged = RecordKey::with(which, 3, two).expect("key");
            for len in [0, 1, 1_000, MAX_PLAINTEXT] {
                let mut a = vec![0xee; 7];
                from.seal(Content::ApplicationData, &message[..len], &mut a)
                    .expect("seal");
                let mut b = vec![0xee; 7];
                b.extend_from_slice(&[0; HEADER_LEN]);
                b.extend_from_slice(&message[..len]);
                staged
                    .seal_staged(Content::ApplicationData, &mut b, 7)
                    .expect("seal staged");
                assert!(a == b, "{which:?}, {len} bytes");
                let mut c = vec![0u8; len + 1 + TAG_LEN];
                let header = record_header(len);
                from.aead
                    .seal_into(
                        from.seq - 1,
                        &header,
                        &message[..len],
                        Content::ApplicationData.byte(),
                        &mut c,
                    )
                    .expect("seal into");
                assert!(
                    c[..] == a[7 + HEADER_LEN..],
                    "{which:?}, {len} bytes, seal_into"
                );
            }
        }
    }
}

#[test]
fn a_send_buffer_over_earlier_bytes_gives_the_same_records() {
    // A connection's `SendBuf` hands out room that held earlier records without zeroing
    // it: every byte of a record must still be written, whichever path seals it.
    let message: Vec<u8> = (0..MAX_PLAINTEXT).map(|i| (i * 7 + 1) as u8).collect();
    for which in [Implementation::AwsLc, Implementation::Ring] {
        for (one, two) in suites(4, 5).into_iter().zip(suites(4, 5)) {
            let mut fresh = RecordKey::with(which, 0, one).expect("key");
            let mut reused = RecordKey::with(which, 0, two).expect("key");
            let mut buf = SendBuf::default();
            buf.extend_from_slice(&vec![0xab; 3 * MAX_PLAINTEXT]);
            for (i, len) in [MAX_PLAINTEXT, 1_000, 0, 1, MAX_PLAINTEXT]
                .into_iter()
                .enumerate()
            {
                let kept = i * 3;
                buf.truncate(kept);
                let mut expected = buf.to_vec();
                fresh
                    .seal(Content::ApplicationData, &message[..len], &mut expected)
                    .expect("seal");
                if i % 2 == 0 {
                    reused
                        .seal(Content::ApplicationData, &message[..len], &mut buf)
                        .expect("seal");
                } else {
                    buf.extend_from_slice(&[0; HEADER_LEN]);
                    buf.extend_from_slice(&message[..len]);
                    reused
                        .seal_staged(Content::ApplicationData, &mut buf, kept)
                        .expect("seal staged");
                }
                assert!(buf[..] == expected[..], "{which:?}, {len} bytes");
            }
        }
    }
}

#[test]
fn a_record_opens_to_an_earlier_place_in_its_buffer() {
    // What the receive side does with a read of several records: each one's content is
    // moved back to follow the previous one's, over the headers and tags between them.
    let suites = || suites(5, 6);
    let head = |at: usize, wire: &[u8]| -> [u8; HEADER_LEN] {
        wire[at..at + HEADER_LEN].try_into().expect("header")
    };
    for which in [Implementation::AwsLc, Implementation::Ring] {
        for (tx, (rx, wrong)) in suites().into_iter().zip(suites().into_iter().zip(suites())) {
            let mut tx = RecordKey::with(which, 0, tx).expect("sealing key");
            let mut rx = RecordKey::with(which, 0, rx).expect("opening key");
            let first: Vec<u8> = (0..MAX_PLAINTEXT).map(|i| i as u8).collect();
            let second: Vec<u8> = (0..1_000).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            tx.seal(Content::ApplicationData, &first, &mut wire)
                .expect("seal");
            tx.seal(Content::ApplicationData, &second, &mut wire)
                .expect("seal");
            let pristine = wire.clone();
            let header = head(0, &wire);
            let end = HEADER_LEN + body_len(&header).expect("header");
            let (content, n) = rx
                .open_within(&header, &mut wire[..end], HEADER_LEN)
                .expect("first");
            assert_eq!((content, n), (Content::ApplicationData, first.len()));
            let header = head(end, &wire);
            let (content, m) = rx
                .open_within(&header, &mut wire[n..], end + HEADER_LEN - n)
                .expect("second, moved back");
            assert_eq!((content, m), (Content::ApplicationData, second.len()));
            assert!(wire[..n] == first[..], "{which:?}");
            assert!(wire[n..n + m] == second[..], "{which:?}");
            // The first record under the wrong sequence number is refused, moved or not.
            let mut again = pristine;
            let mut wrong = RecordKey::with(which, 1, wrong).expect("key");
            assert_eq!(
                wrong.open_within(&head(0, &again), &mut again[..end], HEADER_LEN),
                Err(RecordError::BadMac)
            );
        }
    }
}

#[test]
fn the_last_sequence_number_is_never_used() {
    for which in [Implementation::AwsLc, Implementation::Ring] {
        let [secrets, _] = suites(7, 9);
        let mut tx = RecordKey::with(which, u64::MAX, secrets).expect("key");
        let mut wire = b"earlier records".to_vec();
        assert_eq!(
            tx.seal(Content::ApplicationData, b"secret", &mut wire),
            Err(RecordError::SequenceExhausted)
        );
        // A refused seal leaves nothing of its plaintext where the socket is written from,
        // whichever way it was staged.
        assert_eq!(wire, b"earlier records", "{which:?}");
        let start = wire.len();
        wire.extend_from_slice(&[0; HEADER_LEN]);
        wire.extend_from_slice(b"gathered secret");
        assert_eq!(
            tx.seal_staged(Content::ApplicationData, &mut wire, start),
            Err(RecordError::SequenceExhausted)
        );
        assert_eq!(wire, b"earlier records", "{which:?}");
    }
}
