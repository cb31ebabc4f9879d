//! The Debian package, end to end: `scripts/build-deb.sh` packages the binary
//! under test (the debug build cargo has just made, stripped, fast
//! compression: about 3 s instead of a release build's minutes), and
//! - `dpkg` installs it into a scratch root (`--root` with
//!   `--force-script-chrootless`, so the maintainer scripts run on the host
//!   with DPKG_ROOT set and must honour it; the host's own dpkg database,
//!   groups and units are never touched), and the installed unit must pass
//!   `systemd-analyze verify`;
//! - `dpkg -i` inside a chroot of a Debian 12 rootfs with systemd and no
//!   `/proc` mounted, as when a VM image is baked (debootstrap, mmdebstrap,
//!   packer's chroot builder), configures it and enables the unit for the
//!   next boot.
//!
//! Needs cargo-deb, dpkg and systemd-analyze, and for the chroot root and
//! mmdebstrap (tests/common/rootfs.rs). Without them the tests say so and
//! pass, unless INSTANCE_AGENT_REQUIRE_DEB_TEST=1 (scripts/test.sh installs
//! what they need and sets it), so the full suite always runs them.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::deb::{build_deb, cargo_deb_available};
use common::rootfs::{self, Rootfs};
use common::run_ok;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn required() -> bool {
    std::env::var("INSTANCE_AGENT_REQUIRE_DEB_TEST").as_deref() == Ok("1")
}

/// Whether the tools are there; panics when they must be.
fn tools_available() -> bool {
    let have = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !cargo_deb_available(required()) {
        return false;
    }
    let missing: Vec<&str> = [
        ("dpkg", have("dpkg", &["--version"])),
        ("systemd-analyze", have("systemd-analyze", &["--version"])),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(!required(), "missing {missing:?}: install them");
    eprintln!("SKIPPED: {missing:?} not installed (scripts/test.sh requires this test)");
    false
}

/// A usr-merged root with an empty dpkg database, and the host's systemd
/// units so that `systemd-analyze verify` can resolve the unit's
/// dependencies (docker.service, network-online.target, ...).
fn scratch_root(root: &Path) {
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib/systemd",
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log",
        "run",
        "tmp",
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
        std::os::unix::fs::symlink(target, root.join(link)).expect("symlink");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(root.join("usr/lib/systemd/")),
    );
    // ExecReload=/bin/kill must exist for verify.
    std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill")).expect("copy kill");
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    run_ok(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", root.join("var/log/dpkg.log").display()))
            // Maintainer scripts run on the host with DPKG_ROOT=root instead of
            // chrooted into a root that has no shell; libc6 and fuse3 are not
            // "installed" in the empty database.
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args)
            .env_remove("DPKG_ROOT"),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn deb_installs_into_a_scratch_root_with_a_clean_unit_and_purges() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(&work.path().join("out"));
    let root = work.path().join("root");
    scratch_root(&root);

    dpkg(&root, &["-i", deb.to_str().expect("utf-8")]);

    // Files and modes.
    for (path, expected) in [
        ("usr/bin/instance-agent", 0o755),
        ("lib/systemd/system/instance-agent.service", 0o644),
        ("etc/instance-agent", 0o750),
        ("etc/instance-agent/config.toml", 0o640),
        ("usr/lib/sysusers.d/instance-agent.conf", 0o644),
        ("usr/lib/tmpfiles.d/instance-agent.conf", 0o644),
        // Made by systemd-tmpfiles in postinst.
        ("var/lib/instance-agent", 0o700),
        ("var/log/instance-agent", 0o750),
        ("run/instance-agent", 0o711),
    ] {
        assert_eq!(mode(&root.join(path)), expected, "mode of /{path}");
        assert_eq!(
            std::fs::metadata(root.join(path)).expect("stat").uid(),
            0,
            "/{path} is owned by root"
        );
    }
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/instance-agent.service")).expect("unit"),
        std::fs::read(Path::new(REPO).join("systemd/instance-agent.service")).expect("repo unit"),
        "the unit is shipped unchanged"
    );

    // The default config, generated by the packaged binary, is a conffile.
    let default_config =
        run_ok(Command::new(env!("CARGO_BIN_EXE_instance-agent")).args(["config", "default"]))
            .stdout;
    let config_path = root.join("etc/instance-agent/config.toml");
    assert_eq!(std::fs::read(&config_path).expect("config"), default_config);
    let conffiles =
        std::fs::read_to_string(root.join("var/lib/dpkg/info/instance-agent.conffiles"))
            .expect("conffiles list");
    assert_eq!(conffiles.trim(), "/etc/instance-agent/config.toml");
    let status = String::from_utf8(dpkg(&root, &["-s", "instance-agent"]).stdout).expect("utf-8");
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains(" /etc/instance-agent/config.toml "),
        "conffile with its checksum in the status:\n{status}"
    );

    // sysusers made the operator group in the root, not on the host.
    let group = std::fs::read_to_string(root.join("etc/group")).expect("root's /etc/group");
    assert!(
        group.lines().any(|l| l.starts_with("instance-operators:")),
        "{group}"
    );
    // Enabled for the next boot under systemd (deb-systemd-helper honours
    // DPKG_ROOT); there is no systemd here, so nothing was started.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/instance-agent.service");
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "{} missing",
        wants.display()
    );

    // The installed unit verifies with no output at all.
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("instance-agent.service")
        .output()
        .expect("systemd-analyze");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && printed.is_empty(),
        "systemd-analyze verify printed:\n{printed}"
    );

    // An administrator's edit survives a reinstall (the upgrade path of the
    // maintainer scripts), and so does the directory's mode.
    let edited = format!(
        "{}\n# edited by the administrator\n",
        String::from_utf8_lossy(&default_config)
    );
    std::fs::write(&config_path, &edited).expect("edit config");
    let config_dir = root.join("etc/instance-agent");
    std::fs::set_permissions(&config_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dpkg(&root, &["-i", deb.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::read_to_string(&config_path).expect("config"),
        edited
    );
    assert_eq!(mode(&config_dir), 0o700, "the administrator's mode is kept");

    // Purge removes the files, the conffile, the state and the enablement,
    // and keeps the group.
    std::fs::write(root.join("var/lib/instance-agent/agent.redb"), "state").expect("state");
    dpkg(&root, &["--purge", "instance-agent"]);
    for gone in [
        "usr/bin/instance-agent",
        "lib/systemd/system/instance-agent.service",
        "etc/instance-agent/config.toml",
        "etc/instance-agent",
        "var/lib/instance-agent",
        "var/log/instance-agent",
        "usr/lib/sysusers.d/instance-agent.conf",
    ] {
        assert!(
            std::fs::symlink_metadata(root.join(gone)).is_err(),
            "/{gone} is still there after purge"
        );
    }
    assert!(std::fs::symlink_metadata(&wants).is_err(), "still enabled");
    let group = std::fs::read_to_string(root.join("etc/group")).expect("root's /etc/group");
    assert!(group.contains("instance-operators:"), "{group}");
}

/// Issue 14: in an image build's chroot (no `/proc`, no systemd running),
/// `systemd-tmpfiles` refuses to run ("/proc/ is not mounted, but
/// required"); the postinst used to fail on it and leave the package
/// half-installed. Now `dpkg -i` succeeds, the unit is enabled for the first
/// boot, and the group and the directories are there.
#[test]
fn deb_installs_in_an_image_build_chroot_without_proc() {
    if !tools_available() || !rootfs::host_supports(required(), &["mmdebstrap", "chroot"]) {
        return;
    }
    let rootfs = Rootfs::cached();
    let work = tempfile::Builder::new()
        .prefix("chroot-")
        .tempdir_in(rootfs::harness_dir())
        .expect("tempdir");
    let deb = build_deb(&work.path().join("out"));
    let root = work.path().join("root");
    rootfs.unpack_into(&root);
    // The case under test: systemd's tools are in the image, /proc is not
    // mounted in it.
    assert!(root.join("usr/bin/systemd-tmpfiles").exists());
    assert!(!root.join("proc/self").exists(), "/proc is mounted");
    std::fs::copy(&deb, root.join("tmp/instance-agent.deb")).expect("copy the .deb");

    let install = run_ok(
        Command::new("chroot")
            .arg(&root)
            .args(["dpkg", "-i", "/tmp/instance-agent.deb"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let status = run_ok(Command::new("chroot").arg(&root).args([
        "dpkg-query",
        "-W",
        "-f=${db:Status-Status}",
        "instance-agent",
    ]))
    .stdout;
    assert_eq!(String::from_utf8_lossy(&status), "installed", "{printed}");

    // Enabled for the next boot, as deb-systemd-helper links it.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/instance-agent.service");
    assert_eq!(
        std::fs::read_link(&wants).unwrap_or_else(|e| panic!("{}: {e}", wants.display())),
        Path::new("/lib/systemd/system/instance-agent.service")
    );
    // The group (systemd-sysusers needs no /proc) and the directories (made
    // by hand when systemd-tmpfiles refuses), with the unit's modes.
    let group = std::fs::read_to_string(root.join("etc/group")).expect("/etc/group");
    assert!(
        group.lines().any(|l| l.starts_with("instance-operators:")),
        "{group}"
    );
    for (path, expected) in [
        ("var/lib/instance-agent", 0o700),
        ("var/log/instance-agent", 0o750),
        ("run/instance-agent", 0o711),
        ("etc/instance-agent", 0o750),
    ] {
        assert_eq!(mode(&root.join(path)), expected, "mode of /{path}");
    }
}

/// Every program the unit runs (`Exec*=` lines) is the package's own, or
/// comes from an Essential package or one the package depends on, as the
/// Debian 12 rootfs's dpkg database says. (`ExecReload=/bin/kill` is
/// procps's, which is not Essential: on a minimal system without it,
/// `systemctl reload` failed with status 203/EXEC, seen under the booted
/// systemd of tests/systemd_boot.rs.)
#[test]
fn the_units_programs_come_from_the_package_or_its_dependencies() {
    if !tools_available() || !rootfs::host_supports(required(), &["mmdebstrap"]) {
        return;
    }
    let rootfs = Rootfs::cached();
    let work = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(&work.path().join("out"));
    let field = |name: &str| {
        let out = run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let depends: Vec<String> = field("Depends")
        .split(',')
        .filter_map(|dep| dep.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let admindir = rootfs.tree().join("var/lib/dpkg");
    let query = |args: &[&str]| {
        let out = run_ok(
            Command::new("dpkg-query")
                .arg(format!("--admindir={}", admindir.display()))
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };

    let unit = std::fs::read_to_string(Path::new(REPO).join("systemd/instance-agent.service"))
        .expect("the unit");
    let programs: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Exec"))
        .filter_map(|rest| rest.split_once('=').map(|(_, command)| command))
        .filter_map(|command| {
            command
                .trim_start_matches(['-', '@', ':', '+', '!'])
                .split_whitespace()
                .next()
        })
        .collect();
    assert!(programs.contains(&"/bin/kill"), "{programs:?}");
    for program in programs {
        if program == "/usr/bin/instance-agent" {
            continue;
        }
        let owner = query(&["-S", program]);
        let owner = owner.split(':').next().unwrap_or_default().to_owned();
        let essential = query(&["-W", "-f=${Essential}", &owner]) == "yes";
        assert!(
            essential || depends.contains(&owner),
            "{program} is from {owner}, neither Essential nor in Depends {depends:?}"
        );
    }
}
