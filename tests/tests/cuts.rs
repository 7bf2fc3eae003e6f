//! Snapshot cuts on real loop devices: each `snapshot begin` opens a window
//! of its own that no later begin moves, however many clients cut one
//! volume at once, and a commit is refused when the volume is no longer on
//! the device (instance, offset, capacity) it was on at begin.
//!
//! Truth is the byte comparison of point-in-time images (FICLONE of the
//! volume's backing file, taken between begin and commit), as in
//! `delta.rs`. These tests talk to the agent itself: they have no oracle
//! mode.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use cbt_tests::{
    accuracy::{
        attach_loop, check_pair, detach_loop, fio_random_job, snapshot_reflink, unique_name, write_direct, AccuracyLog,
        Agent, AgentOptions, Cbt, Cbtctl, CtlOut, Expect, Fio, Rng, ScratchFs, Snap, Volume,
    },
    require_root, sh, LoopDevice,
};

const MIB: u64 = 1 << 20;

/// Long enough for the agent (check interval 200 ms) to see a written
/// device idle again, so the write's segment is settled before what
/// follows. Only makes the old bug show reliably: the checks hold without.
const SETTLE: Duration = Duration::from_secs(1);

fn agent_ctl(cbt: &Cbt) -> Cbtctl {
    cbt.ctl().expect("these tests talk to the agent itself (CBT_ACCURACY_BACKEND=agent)")
}

fn snap(vol: &Volume, handle: &str, image: cbt_tests::accuracy::Image, cut: &str) -> Snap {
    Snap { handle: handle.into(), volume: vol.name.clone(), image, cut: cut.into(), taken: Instant::now() }
}

fn assert_ok(out: &CtlOut) {
    assert_eq!(out.code, 0, "{out}");
}

/// Exit 3: FAILED_PRECONDITION, with `why` in the message.
fn assert_refused(out: &CtlOut, why: &str) {
    assert_eq!(out.code, 3, "expected FAILED_PRECONDITION (exit 3): {out}");
    assert!(out.stderr.contains(why), "expected {why:?} in the refusal: {out}");
}

/// The scenario, then the same with cut ids: begin, the backend
/// cuts (an image), 4 KiB written, begin again (a retry), commit, the next
/// snapshot. The delta between the two must cover the 4 KiB: the second
/// begin must not move the first window's start past the write.
#[test]
fn a_retried_begin_does_not_move_the_window() {
    require_root();
    let mut rng = Rng::from_env("cuts-retry");
    let fs = ScratchFs::new("cuts-retry", 1);
    let vol = Volume::new(&fs, "cuts-retry", 64, true);
    let mut cbt = Cbt::start(&[&vol]);
    let ctl = agent_ctl(&cbt);
    let dev = vol.open_direct();
    let mut log = AccuracyLog::new("cuts-retried-begin");

    // Without cut ids, as the issue found it.
    ctl.begin(&vol.name);
    let a = snap(&vol, "a", snapshot_reflink(&vol, "a"), "");
    write_direct(&dev, 5 * MIB, 4096, &mut rng);
    std::thread::sleep(SETTLE);
    ctl.begin(&vol.name);
    let committed = ctl.run(&["snapshot", "commit", &vol.name, "a"]);
    assert_ok(&committed);
    ctl.begin(&vol.name);
    let b = snap(&vol, "b", snapshot_reflink(&vol, "b"), "");
    ctl.commit(&vol.name, "b");
    check_pair(&cbt, &a, &b, Expect::List, true, &mut log);
    // The first begin is left open (untaken: it opens the windows of
    // later commits naming no cut), and the commit said so.
    assert!(committed.stderr.contains("still has open cuts"), "{committed}");
    let left: serde_json::Value = serde_json::from_str(&ctl.ok(&["snapshot", "cuts", "--json"])).unwrap();
    let untaken = left.as_array().unwrap().iter().filter(|c| c["taken"] == false).count();
    assert_eq!(untaken, 1, "{left}");

    // Naming the cuts: the retried begin's cut is aborted.
    let first = ctl.begin(&vol.name);
    let c = snap(&vol, "c", snapshot_reflink(&vol, "c"), &first);
    write_direct(&dev, 9 * MIB, 4096, &mut rng);
    std::thread::sleep(SETTLE);
    let retried = ctl.begin(&vol.name);
    assert_ok(&ctl.commit_cut(&vol.name, "c", &first));
    assert_ok(&ctl.abort(&vol.name, Some(&retried)));
    let d = cbt.snapshot(&vol, "d");
    check_pair(&cbt, &c, &d, Expect::List, true, &mut log);
    // A commit naming a cut already committed, or another volume's, is
    // refused; so is one naming a cut that never was.
    assert_refused(&ctl.commit_cut(&vol.name, "e", &first), "committed as snapshot \"c\"");
    assert_refused(&ctl.commit_cut(&vol.name, "e", "12345"), "not open");
    assert_ok(&ctl.abort(&vol.name, None));
    let left = ctl.ok(&["snapshot", "cuts", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&left).unwrap(), serde_json::json!([]));
    log.finish();
    cbt.assert_healthy();
}

/// 20 clients snapshot one volume at once, three times each, while fio
/// writes to it: half name their cut at commit, half do not; some retry a
/// begin, some abandon one. Every snapshot, against the one after it (by
/// image time) and against a final one, answers a superset.
#[test]
fn twenty_clients_cut_one_volume_at_once() {
    const CLIENTS: usize = 20;
    const ROUNDS: usize = 3;
    require_root();
    let mut rng = Rng::from_env("cuts-many");
    let fs = ScratchFs::new("cuts-many", 2);
    let vol = Volume::new(&fs, "cuts-many", 64, true);
    let mut cbt = Cbt::start(&[&vol]);
    let ctl = agent_ctl(&cbt);
    let fio = Fio::start_checked(&fio_random_job(&vol.name, &vol.dev, 0, vol.size, "6m", rng.u64()));
    // (when the image was taken, the snapshot)
    let snaps: Mutex<Vec<(Instant, Snap)>> = Mutex::new(Vec::new());
    let mut rngs: Vec<Rng> = (0..CLIENTS).map(|_| rng.fork()).collect();
    std::thread::scope(|s| {
        for (client, rng) in rngs.iter_mut().enumerate() {
            let (ctl, vol, snaps) = (ctl.clone(), &vol, &snaps);
            s.spawn(move || {
                let named = client % 2 == 0;
                for round in 0..ROUNDS {
                    let handle = format!("c{client}-{round}");
                    std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
                    if rng.chance(10) {
                        // Abandoned: the client died after begin.
                        ctl.begin(&vol.name);
                    }
                    let mut cut = ctl.begin(&vol.name);
                    if rng.chance(20) {
                        // Retried: the first reply was lost.
                        cut = ctl.begin(&vol.name);
                    }
                    std::thread::sleep(Duration::from_millis(rng.range(0, 100)));
                    let image = snapshot_reflink(vol, &handle);
                    let at = Instant::now();
                    std::thread::sleep(Duration::from_millis(rng.range(0, 100)));
                    if named {
                        assert_ok(&ctl.commit_cut(&vol.name, &handle, &cut));
                    } else {
                        ctl.commit(&vol.name, &handle);
                    }
                    snaps.lock().unwrap().push((at, snap(vol, &handle, image, &cut)));
                }
            });
        }
    });
    let ios = Fio::write_ios(&fio.stop());
    assert!(ios > 100, "fio wrote only {ios} times");
    let last = cbt.snapshot(&vol, "final");
    let mut snaps = snaps.into_inner().unwrap();
    snaps.sort_by_key(|(at, _)| *at);
    let snaps: Vec<Snap> = snaps.into_iter().map(|(_, s)| s).collect();
    assert_eq!(snaps.len(), CLIENTS * ROUNDS);
    let mut log = AccuracyLog::new("cuts-20-clients");
    for (i, pair) in snaps.windows(2).enumerate() {
        check_pair(&cbt, &pair[0], &pair[1], Expect::List, i % 8 == 0, &mut log);
    }
    for s in &snaps {
        check_pair(&cbt, s, &last, Expect::List, false, &mut log);
    }
    log.finish();
    assert_ok(&ctl.abort(&vol.name, None));
    cbt.assert_healthy();
}

/// A loop device attached (and detached on drop) over an existing file.
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        detach_loop(&self.0);
    }
}

/// Points `link` at `target` in one step (rename over it).
fn point(link: &Path, target: &str) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Commits, retrying while the agent has not yet sealed the device (a
/// device it has just found answers UNAVAILABLE, exit 1, for a moment).
fn commit_when_known(ctl: &Cbtctl, volume: &str, handle: &str, cut: &str) -> CtlOut {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ctl.commit_cut(volume, handle, cut);
        if out.code != 1 || !out.stderr.contains("retry") || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The volume's device detached and its backing file attached again (a
/// new instance, as after a re-attach) between begin and commit, under the
/// same volume path: the commit is refused, with or without the cut id.
/// The next begin/commit, on the new instance, works.
#[test]
fn a_commit_after_the_device_was_reattached_is_refused() {
    require_root();
    let fs = ScratchFs::new("cuts-moved", 1);
    let mut first = Volume::new(&fs, "cuts-moved", 64, true);
    let dir = PathBuf::from(format!("/tmp/{}", unique_name("cuts-link")));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("volume");
    point(&link, &first.dev);
    let agent = Agent::start_specs(&[("moved".into(), link.display().to_string())], AgentOptions::default());
    let ctl = agent.ctl();

    let cut = ctl.begin("moved");
    first.detach();
    let again = Attached(attach_loop(&first.backing, "--direct-io=on"));
    point(&link, &again.0);
    assert_refused(&ctl.commit_cut("moved", "s", &cut), "is now on");
    assert_refused(&ctl.run(&["snapshot", "commit", "moved", "s"]), "is now on");
    assert_ok(&ctl.abort("moved", Some(&cut)));
    let cut = ctl.begin("moved");
    assert_ok(&commit_when_known(&ctl, "moved", "s", &cut));

    drop(agent);
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The volume's capacity grown between begin and commit (same device
/// instance, `losetup -c`): refused; the next snapshot has the new size.
#[test]
fn a_commit_after_the_volume_grew_is_refused() {
    require_root();
    let fs = ScratchFs::new("cuts-grown", 1);
    let vol = Volume::new(&fs, "cuts-grown", 64, true);
    let cbt = Cbt::start(&[&vol]);
    let ctl = agent_ctl(&cbt);
    let cut = ctl.begin(&vol.name);
    std::fs::OpenOptions::new().write(true).open(&vol.backing).unwrap().set_len(vol.size + 16 * MIB).unwrap();
    sh(&format!("losetup -c {}", vol.dev));
    assert_refused(&ctl.commit_cut(&vol.name, "s", &cut), "is now on");
    assert_ok(&ctl.abort(&vol.name, Some(&cut)));
    let cut = ctl.begin(&vol.name);
    assert_ok(&commit_when_known(&ctl, &vol.name, "s", &cut));
    let list: serde_json::Value = serde_json::from_str(&ctl.ok(&["snapshot", "list", "--json"])).unwrap();
    assert_eq!(list[0]["capacity_bytes"].as_u64(), Some(vol.size + 16 * MIB), "{list}");
}

/// A volume on a partition whose start moved between begin and commit
/// (the table rewritten on the same disk instance): refused.
#[test]
fn a_commit_after_the_partition_moved_is_refused() {
    require_root();
    let disk = LoopDevice::with_options("cuts-part", 64, "-P");
    let part = format!("{}p1", disk.path);
    // This kernel has no partition-table parsers: partx reads the table in
    // user space and declares the partitions with BLKPG.
    let partition = |start_sector: u64| {
        sh(&format!("printf 'label: dos\\nstart={start_sector}, size=32768\\n' | sfdisk -q {}", disk.path));
        sh(&format!("partx -d {0} 2>/dev/null; partx -a {0}", disk.path));
        let start = format!("/sys/block/{0}/{0}p1/start", disk.name());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&start).ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(start_sector)
            || !Path::new(&part).exists()
        {
            assert!(Instant::now() < deadline, "{part} did not appear at sector {start_sector}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    partition(2048);
    let agent = Agent::start_specs(&[("part".into(), part.clone())], AgentOptions::default());
    let ctl = agent.ctl();
    let cut = ctl.begin("part");
    partition(4096);
    assert_refused(&ctl.commit_cut("part", "s", &cut), "is now on");
    assert_ok(&ctl.abort("part", Some(&cut)));
    let cut = ctl.begin("part");
    assert_ok(&commit_when_known(&ctl, "part", "s", &cut));
    drop(agent);
}
