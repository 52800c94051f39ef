use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn key(host: &str) -> BudgetKey {
    BudgetKey {
        identity: "spiffe://cluster.local/ns/training/sa/trainer".into(),
        host: host.into(),
        policy: "training/hub".into(),
    }
}

fn budget(sent: Option<u64>, received: Option<u64>) -> Budget {
    Budget {
        sent_bytes: sent,
        received_bytes: received,
        per: Duration::from_secs(60),
    }
}

fn ledger(file: Option<PathBuf>) -> Arc<Ledger> {
    Arc::new(Ledger::new(file, BudgetMetrics::default()))
}

#[tokio::test]
async fn writes_stop_at_the_limit_and_the_window_refuses_until_it_rolls() {
    let ledger = ledger(None);
    let t0 = SystemTime::now();
    let b = budget(Some(1000), None);
    let meter = ledger.admit(key("hf.co"), &b, t0).expect("admitted");
    let other = ledger.admit(key("hf.co"), &b, t0).expect("admitted");
    let (a, mut far) = tokio::io::duplex(64 * 1024);
    let mut metered = Metered::new(a, meter.clone());
    // 600 bytes pass whole; of the next 600 only 400 are written, then the window is spent.
    metered.write_all(&[1; 600]).await.expect("under the limit");
    let err = metered.write_all(&[2; 600]).await.expect_err("crosses");
    assert!(err.to_string().contains("training/hub"), "{err}");
    let mut got = vec![0; 1000];
    far.read_exact(&mut got).await.expect("1000 bytes arrived");
    assert!(meter.spent().is_cancelled() && other.spent().is_cancelled());
    // New connections of the key are refused until the window rolls; other hosts are not.
    let refused = ledger.admit(key("hf.co"), &b, t0).expect_err("spent");
    assert_eq!(refused.policy, "training/hub");
    assert!(refused.retry_in <= Duration::from_secs(60));
    assert!(ledger.admit(key("cdn.hf.co"), &b, t0).is_ok());
    let later = t0 + Duration::from_secs(61);
    let fresh = ledger
        .admit(key("hf.co"), &b, later)
        .expect("window rolled");
    assert!(!fresh.spent().is_cancelled());
}

#[tokio::test]
async fn reads_are_cut_at_the_received_limit() {
    let ledger = ledger(None);
    let b = budget(None, Some(100));
    let meter = ledger
        .admit(key("hf.co"), &b, SystemTime::now())
        .expect("admitted");
    let (a, mut far) = tokio::io::duplex(64 * 1024);
    let mut metered = Metered::new(a, meter.clone());
    far.write_all(&[7; 300]).await.expect("written");
    let mut got = Vec::new();
    let err = metered.read_to_end(&mut got).await.expect_err("cut");
    assert_eq!(got.len(), 100, "{err}");
    assert!(meter.spent().is_cancelled());
}

#[test]
fn a_restart_keeps_the_spending_and_the_exhaustion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(crate::egress::BUDGETS_FILE);
    let now = SystemTime::now();
    let b = budget(Some(10), None);
    let first = ledger(Some(file.clone()));
    let meter = first.admit(key("hf.co"), &b, now).expect("admitted");
    let granted = first.reserve(&meter, Direction::Sent, 25, now);
    first.settle(&key("hf.co"), Direction::Sent, granted, granted);
    assert_eq!(granted, 10);
    first.persist();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)
        .expect("saved")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = ledger(Some(file.clone()));
    second.restore(now);
    assert!(second.admit(key("hf.co"), &b, now).is_err(), "still spent");
    // A window that ended while the ztunnel was down is gone.
    let third = ledger(Some(file));
    third.restore(now + Duration::from_secs(120));
    assert!(
        third
            .admit(key("hf.co"), &b, now + Duration::from_secs(120))
            .is_ok()
    );
    // Garbage in the file is an empty ledger, not a crash.
    std::fs::write(dir.path().join("garbage.json"), b"{not json").expect("write");
    let fourth = ledger(Some(dir.path().join("garbage.json")));
    fourth.restore(now);
    assert!(fourth.admit(key("hf.co"), &b, now).is_ok());
}

thread_local! {
    static NOW: std::cell::Cell<SystemTime> = const { std::cell::Cell::new(SystemTime::UNIX_EPOCH) };
}

fn test_now() -> SystemTime {
    NOW.with(std::cell::Cell::get)
}

#[tokio::test]
async fn a_window_that_ends_under_an_open_connection_rolls_in_place() {
    let t0 = SystemTime::now();
    NOW.with(|n| n.set(t0));
    let mut l = Ledger::new(None, BudgetMetrics::default());
    l.clock = test_now;
    let ledger = Arc::new(l);
    let b = budget(Some(1000), Some(100 << 30));
    let meter = ledger.admit(key("hf.co"), &b, t0).expect("admitted");
    let (a, mut far) = tokio::io::duplex(64 * 1024);
    let mut metered = Metered::new(a, meter.clone());
    metered.write_all(&[1; 600]).await.expect("under the limit");
    // The window ends under the open connection; the ledger's second passes.
    let later = t0 + Duration::from_secs(61);
    ledger.expire(later);
    NOW.with(|n| n.set(later));
    metered
        .write_all(&[2; 600])
        .await
        .expect("the next window has room");
    let mut got = vec![0; 1200];
    far.read_exact(&mut got).await.expect("1200 bytes arrived");
    let windows = ledger.windows();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0]["sent"], 600, "{windows:?}");
    assert_eq!(windows[0]["start"], unix(later), "{windows:?}");
    assert!(!meter.spent().is_cancelled());
    // The rolled window still closes the connection when it is spent.
    metered.write_all(&[3; 600]).await.expect_err("crosses");
    assert!(meter.spent().is_cancelled());
    // Once the connection is gone, its ended window is dropped.
    drop((metered, meter));
    ledger.expire(later + Duration::from_secs(61));
    assert!(ledger.windows().is_empty());
}
