//! The CSI services over a real UNIX socket, called through the generated
//! clients (and `cbtctl`), against a scripted [`MetadataSource`]. The truth
//! every stream is compared with is computed here from the chunk sets, never
//! with the service's own code.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use cbt_agent::{
    query::{ChunkMap, MetadataSource, QueryError},
    service::{
        self,
        csi::{
            identity_client::IdentityClient, plugin_capability, snapshot_metadata_client::SnapshotMetadataClient,
            BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataDeltaRequest, GetPluginCapabilitiesRequest,
            GetPluginInfoRequest, ProbeRequest,
        },
        MetadataType, ServiceError, ServiceOptions, MAX_TUPLES_PER_MESSAGE,
    },
};
use roaring::RoaringTreemap;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Code};

// ---------------------------------------------------------------- harness

/// Answers from a table; `delta` is looked up as "BASE..TARGET".
#[derive(Default)]
struct Scripted {
    ready: AtomicBool,
    answers: Mutex<HashMap<String, Result<ChunkMap, QueryError>>>,
}

impl Scripted {
    fn set(&self, key: &str, answer: Result<ChunkMap, QueryError>) {
        self.answers.lock().unwrap().insert(key.to_string(), answer);
    }

    fn answer(&self, key: &str) -> Result<ChunkMap, QueryError> {
        self.answers.lock().unwrap().get(key).cloned().unwrap_or_else(|| Err(QueryError::NotFound(key.to_string())))
    }
}

impl MetadataSource for Scripted {
    fn allocated(&self, snapshot_id: &str) -> Result<ChunkMap, QueryError> {
        self.answer(snapshot_id)
    }

    fn delta(&self, base: &str, target: &str) -> Result<ChunkMap, QueryError> {
        self.answer(&format!("{base}..{target}"))
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    source: Arc<Scripted>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServiceError>>>,
}

impl Server {
    async fn start(options: ServiceOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        // A directory serve() must create.
        let socket = dir.path().join("run/csi.sock");
        let source = Arc::new(Scripted::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = {
            let (socket, source) = (socket.clone(), source.clone());
            tokio::spawn(async move {
                service::serve(&socket, source, options, async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Server { _dir: dir, socket, source, stop: Some(stop), task: Some(task) }
    }

    async fn channel(&self) -> Channel {
        service::connect(&self.socket).await.expect("connect")
    }

    async fn metadata(&self) -> SnapshotMetadataClient<Channel> {
        SnapshotMetadataClient::new(self.channel().await)
    }

    async fn shutdown(mut self) -> Result<(), ServiceError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("serve() returns after shutdown")
            .unwrap()
    }
}

fn options() -> ServiceOptions {
    ServiceOptions::new("hostpath.csi.k8s.io")
}

fn map(capacity: u64, granularity: u64, chunks: &[u64]) -> ChunkMap {
    ChunkMap { capacity_bytes: capacity, granularity, chunks: Arc::new(chunks.iter().copied().collect()) }
}

/// One stream, drained: (type, capacity) of each message and its tuples.
#[derive(Debug, Default)]
struct Drained {
    kinds: Vec<(i32, i64)>,
    messages: Vec<Vec<(i64, i64)>>,
}

impl Drained {
    fn tuples(&self) -> Vec<(i64, i64)> {
        self.messages.iter().flatten().copied().collect()
    }
}

async fn allocated(
    client: &mut SnapshotMetadataClient<Channel>,
    id: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Drained, tonic::Status> {
    let request = GetMetadataAllocatedRequest {
        snapshot_id: id.into(),
        starting_offset,
        max_results,
        secrets: Default::default(),
    };
    let mut stream = client.get_metadata_allocated(request).await?.into_inner();
    let mut drained = Drained::default();
    while let Some(m) = stream.message().await? {
        drained.kinds.push((m.block_metadata_type, m.volume_capacity_bytes));
        drained.messages.push(m.block_metadata.iter().map(|b| (b.byte_offset, b.size_bytes)).collect());
    }
    Ok(drained)
}

async fn delta(
    client: &mut SnapshotMetadataClient<Channel>,
    base: &str,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Drained, tonic::Status> {
    let request = GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset,
        max_results,
        secrets: HashMap::from([("token".into(), "hunter2".into())]),
    };
    let mut stream = client.get_metadata_delta(request).await?.into_inner();
    let mut drained = Drained::default();
    while let Some(m) = stream.message().await? {
        drained.kinds.push((m.block_metadata_type, m.volume_capacity_bytes));
        drained.messages.push(m.block_metadata.iter().map(|b| (b.byte_offset, b.size_bytes)).collect());
    }
    Ok(drained)
}

/// The spec's stream rules, checked independently of the service's code.
fn check_rules(d: &Drained, ty: BlockMetadataType, capacity: u64, granularity: u64, starting_offset: i64) {
    for k in &d.kinds {
        assert_eq!(*k, (ty as i32, capacity as i64), "type and capacity in every message, constant");
    }
    let tuples = d.tuples();
    if let Some(&(off, size)) = tuples.first() {
        assert!(off + size > starting_offset, "first tuple {off}+{size} must end after {starting_offset}");
    }
    for (i, &(off, size)) in tuples.iter().enumerate() {
        assert!(size > 0, "tuple {i}: size {size}");
        assert!(off >= 0 && (off as u64) < capacity, "tuple {i} at {off} inside the volume");
        assert!((off + size) as u64 <= capacity, "tuple {i} [{off}, {}) clamped to {capacity}", off + size);
        assert_eq!(off as u64 % granularity, 0, "tuple {i} starts on a chunk boundary");
        if i > 0 {
            let (poff, psize) = tuples[i - 1];
            assert!(poff + psize <= off, "tuple {i} at {off} overlaps the previous [{poff}, {})", poff + psize);
            if ty == BlockMetadataType::VariableLength {
                assert!(poff + psize < off, "VARIABLE_LENGTH: adjacent chunks must be coalesced at {off}");
            }
        }
        if ty == BlockMetadataType::FixedLength {
            let last = i == tuples.len() - 1;
            assert!(
                size as u64 == granularity || (last && (off + size) as u64 == capacity),
                "FIXED_LENGTH tuple {i} at {off} has size {size}"
            );
        }
    }
}

/// The chunks the tuples cover.
fn covered(tuples: &[(i64, i64)], granularity: u64) -> BTreeSet<u64> {
    let g = granularity as i64;
    tuples.iter().flat_map(|&(off, size)| (off / g..(off + size + g - 1) / g).map(|c| c as u64)).collect()
}

/// The truth: chunks of the set that begin inside the volume, from the chunk
/// holding `starting_offset` on.
fn truth(chunks: &[u64], capacity: u64, granularity: u64, starting_offset: u64) -> BTreeSet<u64> {
    chunks.iter().copied().filter(|&c| c * granularity < capacity && c >= starting_offset / granularity).collect()
}

/// xorshift64*: reproducible random sets without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Runs and singletons over `[0, span)`, some past the end.
    fn chunks(&mut self, span: u64) -> Vec<u64> {
        let mut set = BTreeSet::new();
        for _ in 0..self.below(40) {
            let start = self.below(span + span / 4);
            let len = if self.below(3) == 0 { 1 + self.below(200) } else { 1 };
            set.extend(start..start + len);
        }
        set.into_iter().collect()
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn identity_reports_name_capability_and_readiness() {
    let mut opts = options();
    opts.vendor_version = "9.9.9".into();
    let server = Server::start(opts).await;
    let mut identity = IdentityClient::new(server.channel().await);

    let info = identity.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.name.as_str(), info.vendor_version.as_str()), ("hostpath.csi.k8s.io", "9.9.9"));

    let caps = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let snapshot_metadata = plugin_capability::Type::Service(plugin_capability::Service {
        r#type: plugin_capability::service::Type::SnapshotMetadataService as i32,
    });
    assert!(caps.capabilities.iter().any(|c| c.r#type == Some(snapshot_metadata)), "{caps:?}");

    assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(false));
    server.source.ready.store(true, Ordering::SeqCst);
    assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn serve_validates_options_and_guards_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let source: Arc<dyn MetadataSource> = Arc::new(Scripted::default());
    let socket = dir.path().join("csi.sock");
    let never = std::future::pending::<()>();

    let err = service::serve(&socket, source.clone(), ServiceOptions::new(""), never).await.unwrap_err();
    assert!(matches!(err, ServiceError::InvalidOptions(_)), "{err}");
    let mut zero = options();
    zero.default_max_results = 0;
    let err = service::serve(&socket, source.clone(), zero, std::future::pending()).await.unwrap_err();
    assert!(matches!(err, ServiceError::InvalidOptions(_)), "{err}");

    // Not a socket: left alone.
    std::fs::write(&socket, b"precious").unwrap();
    let err = service::serve(&socket, source.clone(), options(), std::future::pending()).await.unwrap_err();
    assert!(matches!(err, ServiceError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
    std::fs::remove_file(&socket).unwrap();

    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = Server::start_at(socket.clone(), dir).await;
    let mode = std::fs::metadata(&server.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A live one is not.
    let err = service::serve(&socket, source, options(), std::future::pending()).await.unwrap_err();
    assert!(matches!(err, ServiceError::SocketInUse { .. }), "{err}");
    IdentityClient::new(server.channel().await).probe(ProbeRequest {}).await.expect("first server still serves");

    let socket = server.socket.clone();
    server.shutdown().await.unwrap();
    assert!(!socket.exists(), "socket removed at shutdown");
}

impl Server {
    /// Like `start`, on a given path in a given directory.
    async fn start_at(socket: PathBuf, dir: tempfile::TempDir) -> Server {
        let source = Arc::new(Scripted::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = {
            let (socket, source) = (socket.clone(), source.clone());
            tokio::spawn(async move {
                service::serve(&socket, source, options(), async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        // The stale file exists from the start: wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while service::connect(&socket).await.is_err() {
            assert!(Instant::now() < deadline, "server never answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Server { _dir: dir, socket, source, stop: Some(stop), task: Some(task) }
    }
}

#[tokio::test]
async fn random_sets_are_reported_exactly_in_both_layouts() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for layout in [MetadataType::Variable, MetadataType::Fixed] {
        let mut opts = options();
        opts.block_metadata_type = layout;
        let server = Server::start(opts).await;
        let mut client = server.metadata().await;
        let ty = match layout {
            MetadataType::Variable => BlockMetadataType::VariableLength,
            MetadataType::Fixed => BlockMetadataType::FixedLength,
        };
        for round in 0..30 {
            let granularity = 512u64 << rng.below(4);
            let span = 1 + rng.below(3000);
            // Sometimes not a multiple of the granularity.
            let capacity = span * granularity - if rng.below(2) == 0 { rng.below(granularity) } else { 0 };
            let chunks = rng.chunks(span);
            let max_results = [0, 1, 3, 1000][rng.below(4) as usize];
            server.source.set("snap", Ok(map(capacity, granularity, &chunks)));
            server.source.set("a..b", Ok(map(capacity, granularity, &chunks)));

            let d = allocated(&mut client, "snap", 0, max_results).await.unwrap();
            check_rules(&d, ty, capacity, granularity, 0);
            assert_eq!(covered(&d.tuples(), granularity), truth(&chunks, capacity, granularity, 0), "round {round}");
            let d2 = delta(&mut client, "a", "b", 0, max_results).await.unwrap();
            assert_eq!(d2.tuples(), d.tuples(), "delta and allocated encode alike");
        }
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn adjacent_chunks_coalesce_and_the_last_tuple_is_clamped() {
    let server = Server::start(options()).await;
    let mut client = server.metadata().await;
    // Capacity 10.5 chunks; chunks 10 and 11 reach past it.
    server.source.set("s", Ok(map(10 * 4096 + 2048, 4096, &[0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 40])));
    let d = allocated(&mut client, "s", 0, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(0, 3 * 4096), (4 * 4096, 4096), (6 * 4096, 4 * 4096 + 2048)]);
    assert_eq!(d.kinds[0], (BlockMetadataType::VariableLength as i32, 10 * 4096 + 2048));
    server.shutdown().await.unwrap();

    let mut opts = options();
    opts.block_metadata_type = MetadataType::Fixed;
    let server = Server::start(opts).await;
    let mut client = server.metadata().await;
    server.source.set("s", Ok(map(3 * 4096 + 1, 4096, &[0, 1, 3, 4])));
    let d = allocated(&mut client, "s", 0, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(0, 4096), (4096, 4096), (3 * 4096, 1)]);
    assert_eq!(d.kinds[0].0, BlockMetadataType::FixedLength as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_results_is_honoured_and_capped() {
    let mut opts = options();
    opts.default_max_results = 7;
    opts.block_metadata_type = MetadataType::Fixed;
    let server = Server::start(opts).await;
    let mut client = server.metadata().await;
    let chunks: Vec<u64> = (0..50).collect();
    server.source.set("s", Ok(map(1 << 30, 4096, &chunks)));

    let sizes = |d: &Drained| d.messages.iter().map(Vec::len).collect::<Vec<_>>();
    let d = allocated(&mut client, "s", 0, 0).await.unwrap();
    assert_eq!(sizes(&d), vec![7, 7, 7, 7, 7, 7, 7, 1], "0 → the default");
    let d = allocated(&mut client, "s", 0, 1).await.unwrap();
    assert_eq!(sizes(&d), vec![1; 50]);
    let d = allocated(&mut client, "s", 0, 1000).await.unwrap();
    assert_eq!(sizes(&d), vec![50]);

    // Whatever max_results says, a message stays small.
    let cap = MAX_TUPLES_PER_MESSAGE as usize;
    let many: Vec<u64> = (0..(2 * cap as u64 + 5)).collect();
    server.source.set("many", Ok(map(1 << 40, 4096, &many)));
    let d = allocated(&mut client, "many", 0, i32::MAX).await.unwrap();
    assert_eq!(sizes(&d), vec![cap, cap, 5]);

    let err = allocated(&mut client, "s", 0, -1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn starting_offset_seeks_and_bounds() {
    let server = Server::start(options()).await;
    let mut client = server.metadata().await;
    let g = 4096i64;
    let capacity = 100 * g;
    // Runs [10, 20) and [30, 31); and one chunk far beyond 2^32 chunks is
    // not reachable here, see the seek test below.
    let chunks: Vec<u64> = (10..20).chain([30]).collect();
    server.source.set("s", Ok(map(capacity as u64, g as u64, &chunks)));

    // Inside a run: starts at the chunk boundary below, ends after it.
    let d = allocated(&mut client, "s", 15 * g + 100, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(15 * g, 5 * g), (30 * g, g)]);
    // On a boundary.
    let d = allocated(&mut client, "s", 15 * g, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(15 * g, 5 * g), (30 * g, g)]);
    // The end of a run: the rest only.
    let d = allocated(&mut client, "s", 20 * g, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(30 * g, g)]);
    // Between runs, past the last.
    assert_eq!(allocated(&mut client, "s", 25 * g, 0).await.unwrap().tuples(), vec![(30 * g, g)]);
    assert_eq!(allocated(&mut client, "s", 31 * g, 0).await.unwrap().tuples(), vec![]);
    // == capacity: OK and empty.
    let d = allocated(&mut client, "s", capacity, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![]);
    assert!(d.kinds.iter().all(|k| *k == (BlockMetadataType::VariableLength as i32, capacity)));
    // > capacity and negative: OUT_OF_RANGE.
    assert_eq!(allocated(&mut client, "s", capacity + 1, 0).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(allocated(&mut client, "s", -1, 0).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(delta(&mut client, "a", "b", -1, 0).await.unwrap_err().code(), Code::OutOfRange);

    // == capacity when the capacity is not a multiple of the granularity:
    // the last partial chunk ends at the capacity, not after it.
    server.source.set("odd", Ok(map(10 * 4096 + 7, 4096, &[9, 10])));
    assert_eq!(allocated(&mut client, "odd", 10 * g + 7, 0).await.unwrap().tuples(), vec![]);
    assert_eq!(allocated(&mut client, "odd", 10 * g + 6, 0).await.unwrap().tuples(), vec![(10 * g, 7)]);

    // Seeking far: chunk indices beyond 2^32 (a 16 TiB volume at 4 KiB),
    // starting in an absent 2^32 partition.
    let hi = 1u64 << 32;
    let capacity = 3 * hi * 4096;
    server.source.set("big", Ok(map(capacity, 4096, &[5, hi + 1, hi + 2, 2 * hi + 9])));
    let d = allocated(&mut client, "big", 100 * 4096, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![((hi + 1) as i64 * g, 2 * g), ((2 * hi + 9) as i64 * g, g)]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn resuming_after_the_last_tuple_yields_exactly_the_rest() {
    let mut rng = Rng(42);
    for layout in [MetadataType::Variable, MetadataType::Fixed] {
        let mut opts = options();
        opts.block_metadata_type = layout;
        let server = Server::start(opts).await;
        let mut client = server.metadata().await;
        for _ in 0..3 {
            let capacity = 500 * 4096 - rng.below(4096);
            let chunks = rng.chunks(500);
            server.source.set("a..b", Ok(map(capacity, 4096, &chunks)));
            let all = delta(&mut client, "a", "b", 0, 2).await.unwrap().tuples();
            for k in 0..all.len() {
                let (off, size) = all[k];
                let rest = delta(&mut client, "a", "b", off + size, 2).await.unwrap().tuples();
                assert_eq!(rest, all[k + 1..], "resuming after tuple {k}");
            }
        }
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn refusals_map_to_csi_codes() {
    let server = Server::start(options()).await;
    let mut client = server.metadata().await;

    for (what, d) in [
        ("snapshot_id", allocated(&mut client, "", 0, 0).await),
        ("base_snapshot_id", delta(&mut client, "", "b", 0, 0).await),
        ("target_snapshot_id", delta(&mut client, "a", "", 0, 0).await),
    ] {
        let err = d.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert!(err.message().contains(what), "{}", err.message());
    }

    let cases = [
        (QueryError::NotFound("a".into()), Code::NotFound),
        (QueryError::InvalidArgument("different volumes".into()), Code::InvalidArgument),
        (QueryError::FailedPrecondition("gap at 12:00".into()), Code::FailedPrecondition),
        (QueryError::Unavailable("loading".into()), Code::Unavailable),
    ];
    for (error, code) in cases {
        server.source.set("a..b", Err(error.clone()));
        server.source.set("s", Err(error.clone()));
        for err in [
            delta(&mut client, "a", "b", 0, 0).await.unwrap_err(),
            allocated(&mut client, "s", 0, 0).await.unwrap_err(),
        ] {
            assert_eq!((err.code(), err.message()), (code, error.to_string().as_str()));
        }
    }
    // Unknown ids (the source's NotFound).
    assert_eq!(allocated(&mut client, "nope", 0, 0).await.unwrap_err().code(), Code::NotFound);

    // A chunk map the service cannot encode is the source's bug: INTERNAL.
    server.source.set("s", Ok(map(4096, 0, &[0])));
    assert_eq!(allocated(&mut client, "s", 0, 0).await.unwrap_err().code(), Code::Internal);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_stream_stops_its_producer_and_the_server_goes_on() {
    let mut opts = options();
    opts.block_metadata_type = MetadataType::Fixed;
    let server = Server::start(opts).await;
    let mut client = server.metadata().await;
    // A million one-tuple messages: far more than the channel buffers.
    let set: Arc<RoaringTreemap> = Arc::new((0..1_000_000u64).collect());
    let chunk_map = ChunkMap { capacity_bytes: 1 << 40, granularity: 4096, chunks: set.clone() };
    server.source.set("a..b", Ok(chunk_map));
    let idle = Arc::strong_count(&set);

    let request = GetMetadataDeltaRequest {
        base_snapshot_id: "a".into(),
        target_snapshot_id: "b".into(),
        starting_offset: 0,
        max_results: 1,
        secrets: Default::default(),
    };
    let mut stream = client.get_metadata_delta(request).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    assert!(Arc::strong_count(&set) > idle, "the producer holds the set while it streams");
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&set) > idle {
        assert!(Instant::now() < deadline, "producer still running 5 s after the client cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Same connection and a new one both still work.
    let d = delta(&mut client, "a", "b", 999_998i64 * 4096, 0).await.unwrap();
    assert_eq!(d.tuples(), vec![(999_998i64 * 4096, 4096), (999_999i64 * 4096, 4096)]);
    let mut fresh = server.metadata().await;
    assert_eq!(delta(&mut fresh, "a", "b", 999_999i64 * 4096, 0).await.unwrap().tuples().len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_does_not_wait_forever_for_a_stalled_reader() {
    let mut opts = options();
    opts.block_metadata_type = MetadataType::Fixed;
    let server = Server::start(opts).await;
    let mut client = server.metadata().await;
    let set: Arc<RoaringTreemap> = Arc::new((0..1_000_000u64).collect());
    server.source.set("s", Ok(ChunkMap { capacity_bytes: 1 << 40, granularity: 4096, chunks: set.clone() }));
    let idle = Arc::strong_count(&set);
    let request = GetMetadataAllocatedRequest {
        snapshot_id: "s".into(),
        starting_offset: 0,
        max_results: 1,
        secrets: Default::default(),
    };
    let mut stream = client.get_metadata_allocated(request).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    // The reader stalls: serve() gives the call a grace period, then drops it.
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&set) > idle {
        assert!(Instant::now() < deadline, "producer outlived the server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client gets what was in flight, then an error: never an OK end.
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a cut stream must not end OK"),
            Err(status) => {
                assert_ne!(status.code(), Code::Ok);
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_are_independent() {
    let server = Server::start(options()).await;
    let mut rng = Rng(7);
    let mut expected = Vec::new();
    for i in 0..8 {
        let chunks = rng.chunks(2000);
        let capacity = 2000 * 4096;
        server.source.set(&format!("s{i}"), Ok(map(capacity, 4096, &chunks)));
        expected.push(truth(&chunks, capacity, 4096, 0));
    }
    // All streams open at once, read in lock-step, one message each turn.
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut client = server.metadata().await;
        let request = GetMetadataAllocatedRequest {
            snapshot_id: format!("s{i}"),
            starting_offset: 0,
            max_results: 1 + i,
            secrets: Default::default(),
        };
        streams.push(Some(client.get_metadata_allocated(request).await.unwrap().into_inner()));
    }
    let mut got: Vec<Vec<(i64, i64)>> = vec![Vec::new(); 8];
    while streams.iter().any(Option::is_some) {
        for (i, slot) in streams.iter_mut().enumerate() {
            if let Some(stream) = slot {
                match stream.message().await.unwrap() {
                    Some(m) => got[i].extend(m.block_metadata.iter().map(|b| (b.byte_offset, b.size_bytes))),
                    None => *slot = None,
                }
            }
        }
    }
    for i in 0..8 {
        assert_eq!(covered(&got[i], 4096), expected[i], "stream {i}");
    }
    server.shutdown().await.unwrap();
}

#[test]
fn request_debug_output_hides_secrets() {
    let request = GetMetadataDeltaRequest {
        base_snapshot_id: "a".into(),
        target_snapshot_id: "b".into(),
        starting_offset: 0,
        max_results: 0,
        secrets: HashMap::from([("token".into(), "hunter2".into())]),
    };
    let text = format!("{request:?}");
    assert!(!text.contains("hunter2") && text.contains("redacted"), "{text}");
    let request = GetMetadataAllocatedRequest {
        snapshot_id: "a".into(),
        starting_offset: 0,
        max_results: 0,
        secrets: HashMap::from([("token".into(), "hunter2".into())]),
    };
    assert!(!format!("{request:?}").contains("hunter2"));
}

// ----------------------------------------------------------------- cbtctl

fn cbtctl(socket: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cbtctl"))
        .arg("--csi-socket")
        .arg(socket)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run cbtctl")
}

async fn cbtctl_async(socket: &Path, args: &[&str]) -> std::process::Output {
    let socket = socket.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || cbtctl(&socket, &args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbtctl_lists_and_maps_errors_to_exit_codes() {
    let server = Server::start(options()).await;
    server.source.set("s", Ok(map(10 * 4096 + 1, 4096, &[1, 2, 5, 10])));
    server.source.set("a..b", Err(QueryError::FailedPrecondition("gap at 12:00".into())));

    let out = cbtctl_async(&server.socket, &["allocated", "s", "-o", "json", "--max-results", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "block_metadata_type": "VARIABLE_LENGTH",
            "volume_capacity_bytes": 10 * 4096 + 1,
            "block_metadata": [
                {"byte_offset": 4096, "size_bytes": 8192},
                {"byte_offset": 5 * 4096, "size_bytes": 4096},
                {"byte_offset": 10 * 4096, "size_bytes": 1},
            ]
        })
    );

    let out = cbtctl_async(&server.socket, &["allocated", "s", "--starting-offset", "20480"]).await;
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].contains("20480") && rows[0].contains("0x5000"), "{table}");

    let out = cbtctl_async(&server.socket, &["delta", "a", "b"]).await;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("full backup required: ") && stderr.contains("gap at 12:00"), "{stderr}");

    let out = cbtctl_async(&server.socket, &["delta", "x", "y"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));

    server.source.set("a..b", Err(QueryError::Unavailable("loading".into())));
    assert_eq!(cbtctl_async(&server.socket, &["delta", "a", "b"]).await.status.code(), Some(1));

    let missing = server.socket.with_file_name("missing.sock");
    assert_eq!(cbtctl_async(&missing, &["allocated", "s"]).await.status.code(), Some(1));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbtctl_copy_turns_the_base_into_the_target() {
    let mut rng = Rng(99);
    let g = 4096u64;
    let capacity = 300 * g + 1000;
    let mut base = vec![0u8; capacity as usize];
    base.iter_mut().for_each(|b| *b = rng.next() as u8);
    let mut target = base.clone();
    // Change some chunks (and the partial last one); report those plus a
    // few unchanged ones (over-reporting is allowed).
    let mut reported = BTreeSet::new();
    for _ in 0..25 {
        let c = rng.below(301);
        let start = (c * g) as usize;
        let end = ((c + 1) * g).min(capacity) as usize;
        target[start..end].iter_mut().for_each(|b| *b = rng.next() as u8);
        reported.insert(c);
    }
    reported.extend([3, 4, 5]);

    let mut opts = options();
    opts.block_metadata_type = MetadataType::Fixed;
    let server = Server::start(opts).await;
    let chunks: Vec<u64> = reported.into_iter().collect();
    server.source.set("a..b", Ok(map(capacity, g, &chunks)));

    let dir = tempfile::tempdir().unwrap();
    let (from, onto) = (dir.path().join("target.img"), dir.path().join("backup.img"));
    std::fs::write(&from, &target).unwrap();
    // The backup is short: copy must extend it to the capacity.
    std::fs::write(&onto, &base[..(200 * g) as usize]).unwrap();
    let onto_s = onto.to_str().unwrap();
    let args = ["copy", "a", "b", "--from", from.to_str().unwrap(), "--onto", onto_s, "--max-results", "3"];
    let out = cbtctl_async(&server.socket, &args).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let copied = std::fs::read(&onto).unwrap();
    assert_eq!(copied.len(), target.len());
    // Past 200 chunks the short backup held zeroes, not the base: compare
    // the part the base really covered, and the reported chunks everywhere.
    assert!(copied[..(200 * g) as usize] == target[..(200 * g) as usize], "backup differs from the target");
    for &c in &chunks {
        let (s, e) = ((c * g) as usize, ((c + 1) * g).min(capacity) as usize);
        assert!(copied[s..e] == target[s..e], "chunk {c} not copied");
    }
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(summary.contains(&format!("{capacity}-byte volume")), "{summary}");

    // A refused delta leaves the output untouched.
    server.source.set("a..b", Err(QueryError::FailedPrecondition("gap".into())));
    std::fs::write(&onto, &base).unwrap();
    let out = cbtctl_async(&server.socket, &args).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(std::fs::read(&onto).unwrap() == base);
    server.shutdown().await.unwrap();
}

/// A server that breaks the stream rules in scripted ways.
struct Misbehaving(Vec<cbt_agent::service::csi::GetMetadataAllocatedResponse>);

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl cbt_agent::service::csi::snapshot_metadata_server::SnapshotMetadata for Misbehaving {
    type GetMetadataAllocatedStream = BoxStream<cbt_agent::service::csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = BoxStream<cbt_agent::service::csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        _request: tonic::Request<GetMetadataAllocatedRequest>,
    ) -> Result<tonic::Response<Self::GetMetadataAllocatedStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(self.0.clone().into_iter().map(Ok)))))
    }

    async fn get_metadata_delta(
        &self,
        _request: tonic::Request<GetMetadataDeltaRequest>,
    ) -> Result<tonic::Response<Self::GetMetadataDeltaStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("scripted"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbtctl_rejects_streams_that_break_the_rules() {
    use cbt_agent::service::csi::{BlockMetadata, GetMetadataAllocatedResponse};
    let msg = |ty: BlockMetadataType, capacity: i64, tuples: &[(i64, i64)]| GetMetadataAllocatedResponse {
        block_metadata_type: ty as i32,
        volume_capacity_bytes: capacity,
        block_metadata: tuples
            .iter()
            .map(|&(byte_offset, size_bytes)| BlockMetadata { byte_offset, size_bytes })
            .collect(),
    };
    let (v, f) = (BlockMetadataType::VariableLength, BlockMetadataType::FixedLength);
    let cases = [
        ("overlap across messages", vec![msg(v, 1 << 20, &[(0, 8192)]), msg(v, 1 << 20, &[(4096, 4096)])]),
        ("descending", vec![msg(v, 1 << 20, &[(8192, 4096), (0, 4096)])]),
        ("zero size", vec![msg(v, 1 << 20, &[(0, 0)])]),
        ("capacity changes", vec![msg(v, 1 << 20, &[(0, 4096)]), msg(v, 2 << 20, &[(8192, 4096)])]),
        ("type changes", vec![msg(v, 1 << 20, &[(0, 4096)]), msg(f, 1 << 20, &[(8192, 4096)])]),
        ("unknown type", vec![msg(BlockMetadataType::Unknown, 1 << 20, &[(0, 4096)])]),
        ("fixed sizes differ", vec![msg(f, 1 << 20, &[(0, 4096), (8192, 8192)])]),
        ("past the capacity", vec![msg(v, 4096, &[(0, 4096), (4096, 4096)])]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, messages)) in cases.into_iter().enumerate() {
        let socket = dir.path().join(format!("bad{i}.sock"));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(cbt_agent::service::csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                    Misbehaving(messages),
                ))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let out = cbtctl_async(&socket, &["allocated", "s", "-o", "json"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("broke the stream rules"), "{what}: {stderr}");
        assert!(out.stdout.is_empty(), "{what}: nothing listed");
        server.abort();
    }
}

// ------------------------------------------------- gRPC C-core (Python grpcio)

/// The Python with grpcio that `cargo xtask setup` installs in a venv under
/// target/ (`$CBT_GRPCIO_PYTHON` overrides it).
fn grpcio_python() -> PathBuf {
    let python = std::env::var_os("CBT_GRPCIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grpcio-venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: `cargo xtask setup` installs grpcio there (or set CBT_GRPCIO_PYTHON)",
        python.display()
    );
    python
}

/// Runs tests/grpcio_client.py against `socket`: one JSON value per call.
async fn grpcio(socket: &Path, calls: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = std::process::Command::new(grpcio_python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcio_client.py")).arg(socket).args(calls);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run the grpcio client")).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "grpcio client failed ({}):\n{stdout}{stderr}", out.status);
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// C-core (Python, C++, Java since 2023) sends the percent-encoded socket
/// path as `:authority`, which h2 used to reset as malformed: every call
/// failed INTERNAL. The socket's directory name holds characters C-core
/// escapes, as real paths do (`/run/cbt/csi.sock` becomes `%2Frun%2F...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_c_core_clients_with_default_options_are_served() {
    let server = Server::start(options()).await;
    let (capacity, granularity) = (300 * 4096 + 512, 4096);
    let chunks = [0, 1, 2, 9, 120, 121, 122, 123, 299, 300, 301];
    server.source.set("base-1..target-2", Ok(map(capacity, granularity, &chunks)));

    let out =
        grpcio(&server.socket, &["info", "delta", "base-1", "target-2", "2", "delta", "base-1", "nope", "0"]).await;
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0], serde_json::json!({"name": "hostpath.csi.k8s.io", "vendor_version": env!("CARGO_PKG_VERSION")}));

    let messages = out[1]["messages"].as_array().unwrap_or_else(|| panic!("GetMetadataDelta failed: {}", out[1]));
    let mut drained = Drained::default();
    for m in messages {
        let tuples: Vec<(i64, i64)> =
            m[2].as_array().unwrap().iter().map(|t| (t[0].as_i64().unwrap(), t[1].as_i64().unwrap())).collect();
        assert!(tuples.len() <= 2, "max_results 2 honoured: {m}");
        drained.kinds.push((m[0].as_i64().unwrap() as i32, m[1].as_i64().unwrap()));
        drained.messages.push(tuples);
    }
    check_rules(&drained, BlockMetadataType::VariableLength, capacity, granularity, 0);
    assert_eq!(covered(&drained.tuples(), granularity), truth(&chunks, capacity, granularity, 0));
    assert_eq!(out[2]["error"], "NOT_FOUND", "{}", out[2]);
    server.shutdown().await.unwrap();
}

/// A 1 MiB snapshot id used to come back whole in the status message, which
/// clients refuse (C-core: RESOURCE_EXHAUSTED instead of NOT_FOUND). Ids
/// longer than any handle are refused up front; any message is bounded.
#[tokio::test]
async fn huge_ids_are_refused_with_short_messages() {
    let server = Server::start(options()).await;
    let mut client = server.metadata().await;
    let huge = "x".repeat(1 << 20);
    for (what, result) in [
        ("snapshot_id", allocated(&mut client, &huge, 0, 0).await),
        ("base_snapshot_id", delta(&mut client, &huge, "b", 0, 0).await),
        ("target_snapshot_id", delta(&mut client, "a", &huge, 0, 0).await),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert!(err.message().contains(what) && err.message().len() < 200, "{what}: {}", err.message());
    }

    // The longest id that can name a snapshot is looked up, and echoed cut.
    let longest = "y".repeat(cbt_agent::names::MAX_HANDLE_BYTES);
    let err = allocated(&mut client, &longest, 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 200 && err.message().contains("(1024 bytes)"), "{}", err.message());

    // Whatever the source says, the message stays short and keeps its end.
    server.source.set("s", Err(QueryError::FailedPrecondition(format!("gap: {}", "z".repeat(1 << 20)))));
    let err = allocated(&mut client, "s", 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().len() <= 1100, "{} bytes", err.message().len());
    assert!(err.message().starts_with("changed blocks cannot be proven complete: gap: zzz"), "{}", err.message());
    assert!(err.message().ends_with("; take a full backup"), "{}", err.message());
    server.shutdown().await.unwrap();
}

/// The same through the client that refused the huge message: C-core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_core_client_gets_a_short_refusal_for_a_huge_id() {
    let server = Server::start(options()).await;
    let huge = format!("@{}", 1 << 20);
    let out = grpcio(&server.socket, &["delta", &huge, "b", "0", "delta", "a", &huge, "0"]).await;
    for o in &out {
        assert_eq!(o["error"], "INVALID_ARGUMENT", "{o}");
        assert!(o["details_bytes"].as_u64().unwrap() < 200, "{o}");
    }
    assert_eq!(out.len(), 2);
    server.shutdown().await.unwrap();
}

/// `cbtctl ... | head`: the reader is gone before cbtctl writes. It used to
/// fail with an error message (listings) or panic (`println!` on EPIPE);
/// now it stops quietly with the status a shell shows for SIGPIPE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbtctl_stops_quietly_when_stdout_is_closed() {
    let server = Server::start(options()).await;
    server.source.set("s", Ok(map(1 << 30, 4096, &(0..100_000).step_by(2).collect::<Vec<_>>())));
    server.source.set("a..b", Ok(map(1 << 30, 4096, &[1, 7])));
    let dir = tempfile::tempdir().unwrap();
    let (image, restored) = (dir.path().join("b.img"), dir.path().join("restored.img"));
    std::fs::write(&image, vec![7u8; 8 * 4096]).unwrap();
    std::fs::write(&restored, vec![0u8; 8 * 4096]).unwrap();
    let (image, restored) = (image.to_str().unwrap().to_string(), restored.to_str().unwrap().to_string());
    for args in [
        vec!["allocated", "s"],
        vec!["allocated", "s", "-o", "json"],
        vec!["delta", "a", "b"],
        vec!["copy", "a", "b", "--from", &image, "--onto", &restored],
    ] {
        let (socket, owned): (PathBuf, Vec<String>) =
            (server.socket.clone(), args.iter().map(|s| s.to_string()).collect());
        let out = tokio::task::spawn_blocking(move || {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            std::process::Command::new(env!("CARGO_BIN_EXE_cbtctl"))
                .arg("--csi-socket")
                .arg(&socket)
                .args(&owned)
                .env_remove("RUST_LOG")
                .stdout(writer)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    server.shutdown().await.unwrap();
}

// ------------------------------------------------------ the socket's directory

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Whoever can write the socket's directory could swap the socket for a
/// symlink between bind and chmod (root would chmod the link's target) or
/// squat its name while the agent is down: such a directory is refused,
/// whether named directly or through a symlink, and nothing is left in it.
#[tokio::test]
async fn sockets_are_refused_in_directories_others_can_write() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o777, 0o1777, 0o770, 0o775, 0o757, 0o2770] {
        let shared = dir.path().join(format!("shared-{mode:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = service::Listener::bind(&shared.join("csi.sock"), 0o660).await.err().expect("refused");
        assert!(matches!(err, ServiceError::UnsafeDirectory { .. }), "{mode:o}: {err}");
        assert!(err.to_string().contains("writable by group or others"), "{err}");
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0, "{mode:o}: nothing made there");
        let err = service::serve(&shared.join("csi.sock"), Arc::new(Scripted::default()), options(), async {})
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::UnsafeDirectory { .. }), "{mode:o}: {err}");
    }
    // A symlink is judged by the directory it leads to.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("shared-777"), &link).unwrap();
    let err = service::Listener::bind(&link.join("csi.sock"), 0o660).await.err().expect("refused");
    assert!(matches!(err, ServiceError::UnsafeDirectory { .. }), "{err}");

    // Owned by someone else (as root: chown; otherwise any root-owned one).
    // SAFETY: geteuid has no preconditions.
    let foreign = if unsafe { libc::geteuid() } == 0 {
        let foreign = dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
        foreign
    } else {
        PathBuf::from("/")
    };
    let err = service::Listener::bind(&foreign.join("csi.sock"), 0o660).await.err().expect("refused");
    assert!(matches!(err, ServiceError::UnsafeDirectory { .. }) && err.to_string().contains("belongs to uid"), "{err}");
}

/// A missing directory is made (0755 at most, umask permitting), nested
/// ones too; the socket gets its mode, and goes when the listener does.
#[tokio::test]
async fn a_missing_socket_directory_is_made_for_root_alone() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/cbt/csi.sock");
    let listener = service::Listener::bind(&socket, 0o660).await.unwrap();
    for made in [dir.path().join("run"), dir.path().join("run/cbt")] {
        let mode = mode_of(&made);
        assert!(mode & 0o700 == 0o700 && mode & 0o022 == 0 && mode & !0o755 == 0, "{}: {mode:o}", made.display());
    }
    assert_eq!(mode_of(&socket), 0o660);
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    drop(listener);
    assert!(!socket.exists(), "removed with the listener");

    // The DaemonSet's case: an emptyDir is 0777; the directory the agent
    // makes inside it is its own (deploy/daemonset.yaml: /csi/cbt/csi.sock).
    let empty_dir = dir.path().join("csi");
    std::fs::create_dir(&empty_dir).unwrap();
    std::fs::set_permissions(&empty_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let listener = service::Listener::bind(&empty_dir.join("cbt/csi.sock"), 0o660).await.unwrap();
    drop(listener);
    // Restarted in the same pod: the directory is there already, and fine.
    drop(service::Listener::bind(&empty_dir.join("cbt/csi.sock"), 0o660).await.unwrap());
}

/// Everything after the directory check goes through the directory's
/// descriptor: renaming the path's ancestors afterwards cannot make the
/// agent remove (or chmod) what another directory holds at that name.
#[tokio::test]
async fn renaming_the_path_afterwards_cannot_redirect_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, moved) = (dir.path().join("run"), dir.path().join("moved"));
    let socket = ours.join("csi.sock");
    let listener = service::Listener::bind(&socket, 0o660).await.unwrap();
    std::fs::rename(&ours, &moved).unwrap();
    std::fs::create_dir(&ours).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(listener);
    assert!(socket.exists(), "the other directory's socket is left alone");
    assert!(!moved.join("csi.sock").exists(), "ours is removed where it went");
    drop(other);
}
