//! Unit tests of the images domain on its fakes (engine, registry, disk
//! space), with paused time: single flight, prefetch order and the pull
//! limit, cancellation, each failure's reason, the disk wait, the digest,
//! and the reclaim steps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::config::{ImagesConfig, PullPolicy};
use super::credentials::CredentialStore;
use super::engine::{ImageEngine, LocalImage};
use super::fake::{FakeImageEngine, FakeRegistry, FakeSpace, PullScript};
use super::reclaim::{DanglingImages, UnusedImages};
use super::registry::RegistryError;
use super::{ImageParts, ImageService};
use crate::disk::reclaim::ReclaimStep;
use crate::jobs::{
    ImageProvider, ImageState, ImageWant, PullPhase, RegistryAuth, ResolveError, WantStage,
};
use crate::secret::Secret;
use crate::testing::Rig;

/// Longest a wait may take in paused time.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

struct Images {
    rig: Rig,
    engine: Arc<FakeImageEngine>,
    registry: Arc<FakeRegistry>,
    space: Arc<FakeSpace>,
    service: ImageService,
    config: watch::Sender<ImagesConfig>,
    keep: watch::Sender<Vec<String>>,
}

impl Images {
    fn new(config: ImagesConfig) -> Self {
        let rig = Rig::new();
        let engine = Arc::new(FakeImageEngine::new());
        let registry = Arc::new(FakeRegistry::new());
        let space = Arc::new(FakeSpace::default());
        space.link(engine.clone());
        let (config_tx, config_rx) = watch::channel(config);
        let (keep_tx, keep_rx) = watch::channel(Vec::new());
        let credentials =
            CredentialStore::open(&rig.state_dir().join("images/credentials.json")).unwrap();
        let service = ImageService::new(
            ImageParts {
                engine: engine.clone(),
                registry: registry.clone(),
                space: space.clone(),
                credentials,
                store: rig.store.clone(),
                config: config_rx,
                keep: keep_rx,
            },
            rig.cancel.clone(),
            rig.tasks.clone(),
        )
        .unwrap();
        Self {
            rig,
            engine,
            registry,
            space,
            service,
            config: config_tx,
            keep: keep_tx,
        }
    }

    fn default() -> Self {
        Self::new(ImagesConfig::default())
    }

    /// Waits until `check` holds, looking again whenever paused time moves.
    async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let started = tokio::time::Instant::now();
        while !check(self) {
            assert!(started.elapsed() < WAIT_LIMIT, "waited in vain for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn state(&self, job: &str, image: &str) -> ImageState {
        self.service.state(job, image)
    }
}

fn want(job: &str, image: &str, stage: WantStage) -> ImageWant {
    ImageWant {
        job: job.into(),
        image: image.into(),
        auth: None,
        stage,
    }
}

fn image(reference: &str, id: &str) -> LocalImage {
    LocalImage {
        id: id.into(),
        repo_tags: vec![reference.into()],
        repo_digests: vec![],
        size_bytes: 1000,
    }
}

const A: &str = "registry.test:5000/team/a:1";
const B: &str = "registry.test:5000/team/b:1";
const C: &str = "registry.test:5000/team/c:1";

fn gated(reference: &str, id: &str) -> PullScript {
    let mut script = PullScript::image(reference, id, 3, 100);
    script.gated = true;
    script
}

#[tokio::test(start_paused = true)]
async fn a_local_image_seen_again_by_a_new_job_is_announced_ready_at_once() {
    let t = Images::default();
    t.engine.add(image(A, "sha256:aaaa"));
    t.service.want(vec![want("j1", A, WantStage::Due)]);
    t.wait_for("j1's image found local", |t| {
        t.state("j1", A) == ImageState::Ready
    })
    .await;
    // j1 is done: nothing is wanted, the reference is forgotten.
    t.service.want(Vec::new());
    let mut changes = t.service.changes();
    changes.borrow_and_update();
    // The queue's first look at j2 comes before it says what it wants.
    assert!(matches!(t.state("j2", A), ImageState::Pulling(_)));
    t.service.want(vec![want("j2", A, WantStage::Due)]);
    assert_eq!(t.state("j2", A), ImageState::Ready);
    assert!(
        changes.has_changed().unwrap(),
        "the queue is told to look again (else a start waits for its timer)"
    );
}

#[tokio::test(start_paused = true)]
async fn jobs_and_callers_of_one_image_share_one_pull_and_its_progress() {
    let t = Images::default();
    t.engine.script(A, gated(A, "sha256:aaaa"));
    start_pull(&t, "j1", A).await;
    t.service.want(vec![
        want("j1", A, WantStage::Due),
        want("j2", A, WantStage::Queued),
        // Another spelling of the same image.
        want("j3", "registry.test:5000/team/a:1", WantStage::Queued),
    ]);
    t.wait_for("the pull to run", |t| t.engine.pulls(A) == 1)
        .await;
    let mut call = t.service.pull(A).unwrap();
    t.wait_for(
        "layers seen",
        |t| matches!(t.state("j2", A), ImageState::Pulling(v) if v.layers_total == 3),
    )
    .await;
    let pulls = t.service.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert_eq!(pulls[0].needed_by, ["j1", "j2", "j3", "api"]);
    t.engine.open(A);
    t.wait_for("all ready", |t| {
        ["j1", "j2", "j3"]
            .iter()
            .all(|j| t.state(j, A) == ImageState::Ready)
    })
    .await;
    assert_eq!(t.engine.pulls(A), 1, "one pull for everyone");
    while call.progress.changed().await.is_ok() {}
    let last = call.progress.borrow().clone();
    assert_eq!(last.view.phase, PullPhase::Done);
    assert_eq!(last.digest, "registry.test:5000/team/a@sha256:aaaa");
    assert_eq!((last.view.layers_done, last.view.layers_total), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn queued_images_are_pulled_ahead_in_order_up_to_the_limit() {
    let t = Images::default();
    for (reference, id) in [(A, "sha256:a"), (B, "sha256:b"), (C, "sha256:c")] {
        t.engine.script(reference, gated(reference, id));
    }
    let wants = vec![
        want(
            "running",
            "registry.test:5000/team/local:1",
            WantStage::Active,
        ),
        want("next", B, WantStage::Queued),
        want("later", C, WantStage::Queued),
        want("due", A, WantStage::Due),
    ];
    settle(&t, wants.clone()).await;
    t.wait_for("two pulls", |t| t.engine.pulls(A) + t.engine.pulls(B) == 2)
        .await;
    assert_eq!(t.engine.pulls(C), 0, "max_concurrent_pulls = 2");
    match t.state("later", C) {
        ImageState::Pulling(view) => {
            assert_eq!(view.phase, PullPhase::Queued);
            assert!(view.reason.contains("max_concurrent_pulls"), "{view:?}");
        }
        other => panic!("{other:?}"),
    }
    t.engine.open(A);
    t.wait_for("a ready", |t| t.state("due", A) == ImageState::Ready)
        .await;
    // The dispatcher states its wants again after the change.
    t.service.want(wants.clone());
    t.wait_for("the third pull", |t| t.engine.pulls(C) == 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn the_pull_limit_is_live() {
    let t = Images::default();
    for (reference, id) in [(A, "sha256:a"), (B, "sha256:b"), (C, "sha256:c")] {
        t.engine.script(reference, gated(reference, id));
    }
    let wants = vec![
        want("a", A, WantStage::Due),
        want("b", B, WantStage::Queued),
        want("c", C, WantStage::Queued),
    ];
    settle(&t, wants.clone()).await;
    t.wait_for("two pulls", |t| t.engine.pulls(A) + t.engine.pulls(B) == 2)
        .await;
    t.config.send_modify(|c| c.max_concurrent_pulls = 3);
    t.service.want(wants);
    t.wait_for("the third pull at once", |t| t.engine.pulls(C) == 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn without_prefetch_only_due_jobs_pull() {
    let t = Images::new(ImagesConfig {
        prefetch_queued: false,
        ..ImagesConfig::default()
    });
    t.engine.script(A, PullScript::image(A, "sha256:a", 1, 10));
    t.engine.script(B, PullScript::image(B, "sha256:b", 1, 10));
    let wants = vec![
        want("a", A, WantStage::Due),
        want("b", B, WantStage::Queued),
    ];
    settle(&t, wants).await;
    t.wait_for("a ready", |t| t.state("a", A) == ImageState::Ready)
        .await;
    assert_eq!(t.engine.pulls(B), 0);
}

#[tokio::test(start_paused = true)]
async fn a_pull_nobody_needs_any_more_stops() {
    let t = Images::default();
    t.engine.script(A, gated(A, "sha256:a"));
    start_pull(&t, "j", A).await;
    t.wait_for("pulling", |t| t.engine.pulls(A) == 1).await;
    t.service.want(Vec::new());
    t.wait_for("the engine's pull dropped", |t| t.engine.ended(A) == 1)
        .await;
    assert!(t.service.pulls().is_empty());
    assert!(!t.engine.has(A), "the image never arrived");
}

/// States `wants` as the dispatcher does: once, then again after the
/// images were looked up (the first pass only looks them up).
async fn settle(t: &Images, wants: Vec<ImageWant>) {
    t.service.want(wants.clone());
    t.wait_for("looked up", |t| {
        wants
            .iter()
            .filter(|w| w.stage != WantStage::Active)
            .all(|w| !matches!(t.state(&w.job, &w.image), ImageState::Pulling(v) if v.reason.contains("looking")))
    })
    .await;
    t.service.want(wants);
}

/// Starts the pull of `image` for `job`.
async fn start_pull(t: &Images, job: &str, image: &str) {
    settle(t, vec![want(job, image, WantStage::Due)]).await;
}

/// Waits until the pull for `job` failed; its reason.
async fn failure(t: &Images, job: &str, image: &str) -> String {
    t.wait_for("a failure", |t| {
        matches!(t.state(job, image), ImageState::Failed(_))
    })
    .await;
    match t.state(job, image) {
        ImageState::Failed(reason) => reason,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn each_failure_has_the_registrys_reason() {
    let t = Images::default();
    t.registry.answer(
        A,
        Err(RegistryError::NoCredentials {
            registry: "registry.test:5000".into(),
            message: "authentication required".into(),
        }),
    );
    start_pull(&t, "j", A).await;
    let reason = failure(&t, "j", A).await;
    assert!(
        reason.contains("registry registry.test:5000 requires credentials and none are set"),
        "{reason}"
    );
    assert_eq!(t.engine.pulls(A), 0, "the engine is not asked in vain");

    t.registry.answer(
        B,
        Err(RegistryError::NotFound {
            registry: "registry.test:5000".into(),
            image: B.into(),
            message: "manifest unknown".into(),
        }),
    );
    start_pull(&t, "k", B).await;
    let reason = failure(&t, "k", B).await;
    assert!(reason.contains("manifest unknown"), "{reason}");

    // A failure sticks to the jobs that waited, not to the next one.
    t.registry.answer(A, Ok(Default::default()));
    t.engine.script(A, PullScript::image(A, "sha256:a", 1, 10));
    start_pull(&t, "later", A).await;
    t.wait_for("ready", |t| t.state("later", A) == ImageState::Ready)
        .await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_registry_is_retried_until_the_timeout() {
    let t = Images::new(ImagesConfig {
        pull_timeout_seconds: 20,
        ..ImagesConfig::default()
    });
    t.registry.answer(
        A,
        Err(RegistryError::Unreachable {
            registry: "registry.test:5000".into(),
            message: "Connection refused".into(),
        }),
    );
    let started = tokio::time::Instant::now();
    start_pull(&t, "j", A).await;
    t.wait_for(
        "retrying",
        |t| matches!(t.state("j", A), ImageState::Pulling(v) if v.phase == PullPhase::Retrying),
    )
    .await;
    let reason = failure(&t, "j", A).await;
    assert!(
        reason.contains("unreachable: Connection refused"),
        "{reason}"
    );
    assert!(reason.contains("retried for 20 s"), "{reason}");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() <= Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_misleading_engine_error_is_explained_by_the_registry() {
    let t = Images::default();
    let mut script = PullScript::image(A, "sha256:a", 1, 10);
    script.result = Err("read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer".into());
    t.engine.script(A, script);
    start_pull(&t, "j", A).await;
    t.wait_for("pulled once", |t| t.engine.pulls(A) == 1).await;
    // The registry, asked after the engine failed, says why.
    t.registry.answer(
        A,
        Err(RegistryError::NoCredentials {
            registry: "registry.test:5000".into(),
            message: String::new(),
        }),
    );
    let reason = failure(&t, "j", A).await;
    assert!(reason.contains("requires credentials"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_full_disk_during_the_pull_is_named() {
    let t = Images::default();
    let mut script = PullScript::image(A, "sha256:a", 1, 10);
    script.result =
        Err("failed to register layer: write /var/lib/docker/x: no space left on device".into());
    t.engine.script(A, script);
    start_pull(&t, "j", A).await;
    let reason = failure(&t, "j", A).await;
    assert!(
        reason.starts_with("the disk filled up during the pull"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_that_would_cross_the_floor_waits_and_one_that_never_fits_fails() {
    let t = Images::default();
    // 2 layers of 1 GiB: needs ~6 GiB (compressed plus unpacked estimate).
    t.registry.answer(A, Ok(FakeRegistry::sized(2, 1 << 30)));
    t.engine
        .script(A, PullScript::image(A, "sha256:a", 2, 1 << 30));
    t.space.set_free(8 << 30); // 3 GiB above the 5 GiB floor
    start_pull(&t, "j", A).await;
    t.wait_for("waiting for space", |t| {
        matches!(t.state("j", A), ImageState::Pulling(v) if v.phase == PullPhase::WaitingForDisk)
    })
    .await;
    let ImageState::Pulling(view) = t.state("j", A) else {
        unreachable!()
    };
    assert_eq!(view.reason, "waiting for disk space: image needs ~6.0 GiB");
    assert_eq!(t.engine.pulls(A), 0);
    t.space.set_free(20 << 30);
    t.wait_for("ready", |t| t.state("j", A) == ImageState::Ready)
        .await;

    // 100 GiB compressed can never fit on a 200 GiB disk above its floor.
    t.registry.answer(B, Ok(FakeRegistry::sized(1, 100 << 30)));
    start_pull(&t, "k", B).await;
    let reason = failure(&t, "k", B).await;
    assert!(
        reason.starts_with("image needs ~300.0 GiB but the filesystem of /fake/docker holds only"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_waiting_for_space_reclaims_the_agents_unused_images_then_runs() {
    let t = Images::default();
    // The agent pulled A (4 GiB) earlier; nothing needs it any more.
    t.engine
        .script(A, PullScript::image(A, "sha256:a", 1, 4 << 30));
    start_pull(&t, "old", A).await;
    t.wait_for("A pulled", |t| t.state("old", A) == ImageState::Ready)
        .await;
    t.service.want(Vec::new());
    // B needs ~6 GiB; 8 GiB free is 3 GiB above the 5 GiB floor.
    t.registry.answer(B, Ok(FakeRegistry::sized(2, 1 << 30)));
    t.engine
        .script(B, PullScript::image(B, "sha256:b", 2, 1 << 30));
    t.space.set_free(8 << 30);
    start_pull(&t, "new", B).await;
    t.wait_for("B pulled", |t| t.state("new", B) == ImageState::Ready)
        .await;
    assert!(!t.engine.has(A), "the unused image made room");
    assert_eq!(t.engine.pulls(B), 1);
}

#[tokio::test(start_paused = true)]
async fn the_disk_guards_hold_holds_pulls() {
    let t = Images::default();
    t.engine.script(A, PullScript::image(A, "sha256:a", 1, 10));
    t.space
        .set_hold(Some("/ has 1 GiB free, below the 5 GiB floor"));
    start_pull(&t, "j", A).await;
    t.wait_for(
        "held",
        |t| matches!(t.state("j", A), ImageState::Pulling(v) if v.phase == PullPhase::Held),
    )
    .await;
    assert_eq!(t.engine.pulls(A), 0);
    t.space.set_hold(None);
    t.wait_for("ready", |t| t.state("j", A) == ImageState::Ready)
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_jobs_own_credential_goes_to_its_pull_and_the_store_serves_the_rest() {
    let t = Images::default();
    t.service
        .set_credential(
            "registry.test:5000/team",
            "stored",
            Secret::new("pw".into()),
        )
        .await
        .unwrap();
    t.engine.script(A, PullScript::image(A, "sha256:a", 1, 10));
    t.engine.script(B, PullScript::image(B, "sha256:b", 1, 10));
    let own = RegistryAuth {
        username: "job-token".into(),
        password: Secret::new("short-lived".into()),
    };
    let wants = vec![
        ImageWant {
            auth: Some(own),
            ..want("a", A, WantStage::Due)
        },
        want("b", B, WantStage::Due),
    ];
    settle(&t, wants).await;
    t.wait_for("both ready", |t| {
        t.state("a", A) == ImageState::Ready && t.state("b", B) == ImageState::Ready
    })
    .await;
    let mut auths = t.engine.auths();
    auths.sort();
    assert_eq!(
        auths,
        [Some("job-token".to_owned()), Some("stored".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn resolve_gives_the_digest_to_run() {
    let t = Images::default();
    let digest = format!("sha256:{}", "d".repeat(64));
    t.engine.add(LocalImage {
        id: "sha256:imageid".into(),
        repo_tags: vec![A.into()],
        repo_digests: vec![format!("registry.test:5000/team/a@{digest}")],
        size_bytes: 5,
    });
    t.engine.add(image("local/built:1", "sha256:built"));
    let resolved = t.service.resolve("j", A).await.unwrap();
    assert_eq!(
        resolved.digest,
        format!("registry.test:5000/team/a@{digest}")
    );
    assert_eq!(resolved.run, resolved.digest);
    let by_digest = format!("registry.test:5000/team/a@{digest}");
    let resolved = t.service.resolve("k", &by_digest).await.unwrap();
    assert_eq!(resolved.run, by_digest);
    let local = t.service.resolve("l", "local/built:1").await.unwrap();
    assert_eq!(
        (local.run.as_str(), local.digest.as_str()),
        ("sha256:built", "sha256:built")
    );
    assert_eq!(
        t.service.resolve("m", "absent/image:1").await,
        Err(ResolveError::Missing)
    );
}

#[tokio::test(start_paused = true)]
async fn pull_policy_always_pulls_for_each_job() {
    let t = Images::new(ImagesConfig {
        pull_policy: PullPolicy::Always,
        ..ImagesConfig::default()
    });
    t.engine.add(image(A, "sha256:a"));
    t.engine.script(A, PullScript::image(A, "sha256:a", 1, 10));
    start_pull(&t, "j1", A).await;
    t.wait_for("ready", |t| t.state("j1", A) == ImageState::Ready)
        .await;
    start_pull(&t, "j2", A).await;
    t.wait_for("ready", |t| t.state("j2", A) == ImageState::Ready)
        .await;
    assert_eq!(t.engine.pulls(A), 2);
    // Local before the agent pulled it: the image stays the user's.
    let record = t.service.inner.records.get("sha256:a").unwrap();
    assert!(!record.pulled_by_agent);
}

#[tokio::test(start_paused = true)]
async fn reclaim_removes_only_the_agents_unused_images_least_recently_used_first() {
    let t = Images::default();
    for (reference, id) in [(A, "sha256:a"), (B, "sha256:b"), (C, "sha256:c")] {
        t.engine
            .script(reference, PullScript::image(reference, id, 1, 1 << 30));
        start_pull(&t, "puller", reference).await;
        t.wait_for("pulled", |t| {
            t.state("puller", reference) == ImageState::Ready
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    t.service.want(Vec::new());
    // The user's own image, and one a running job needs.
    t.engine.add(image("user/own:1", "sha256:user"));
    t.service.resolve("runner", C).await.unwrap();
    t.service.want(vec![want("runner", C, WantStage::Active)]);
    t.wait_for("c known local", |t| {
        !t.service.lock().jobs_on_image("sha256:c").is_empty()
    })
    .await;
    t.space.set_free(5 << 30); // at the floor: 1 GiB margin missing
    let step = UnusedImages::new(t.service.clone());
    let estimate = step.estimate().await.unwrap();
    assert_eq!(estimate.items, 2, "A and B may go");
    let freed = step.run().await.unwrap();
    assert_eq!(
        freed.items, 1,
        "the floor needs only one: the least recently used"
    );
    assert!(!t.engine.has(A), "A was used least recently");
    assert!(t.engine.has(B));
    assert!(t.engine.has(C), "a running job needs C");
    assert!(t.engine.has("user/own:1"), "never the user's image");
    // Kept by jobs.keep_images: B stays even when space is still short.
    t.keep
        .send_replace(vec!["registry.test:5000/team/b".into()]);
    assert_eq!(step.run().await.unwrap().items, 0);
    assert!(t.engine.has(B));
}

#[tokio::test(start_paused = true)]
async fn only_the_agents_dangling_images_are_reclaimed() {
    let t = Images::default();
    t.engine
        .script(A, PullScript::image(A, "sha256:old", 1, 10));
    start_pull(&t, "j", A).await;
    t.wait_for("pulled", |t| t.state("j", A) == ImageState::Ready)
        .await;
    t.service.want(Vec::new());
    // The tag moves on: the agent's old image is left untagged.
    t.engine.remove(A).await.ok();
    for id in ["sha256:old", "sha256:users-dangling"] {
        t.engine.add(LocalImage {
            id: id.into(),
            size_bytes: 10,
            ..LocalImage::default()
        });
    }
    let step = DanglingImages::new(t.service.clone());
    assert_eq!(step.estimate().await.unwrap().items, 1);
    assert_eq!(step.run().await.unwrap().items, 1);
    assert!(!t.engine.has("sha256:old"));
    assert!(t.engine.has("sha256:users-dangling"), "never the user's");
    drop(t.rig);
}
