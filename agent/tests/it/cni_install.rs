//! CNI install: whenever the config exists, the binary it names is complete; uninstall takes
//! the config away and nothing else.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fairlead_agent::cni_install::{self, Conflist, CONFLIST_NAME, PLUGIN_NAME};
use fairlead_agent::CniInstallError;

use crate::topology::{node_object, TempDir};

/// Large enough that copying takes a while, so a wrong order would be seen.
const PLUGIN_SIZE: usize = 8 << 20;

fn conflist(mtu: u32) -> Conflist {
    Conflist::for_node(
        &node_object(1),
        mtu,
        Path::new("/run/fairlead/agent.sock"),
        Path::new("/var/lib/fairlead/ipam"),
    )
    .unwrap()
}

#[test]
fn the_config_never_appears_before_a_complete_binary() {
    let dir = TempDir::new("cni");
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    let plugin = dir.0.join("plugin");
    fs::create_dir_all(&conf).unwrap();
    fs::write(conf.join("99-other.conflist"), "{}").unwrap();

    let stop = AtomicBool::new(false);
    let (seen, violations) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let (mut seen, mut violations) = (0u32, Vec::new());
            // Bounded: stops when told, or after 60 s at most.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let Ok(config) = fs::read_to_string(conf.join(CONFLIST_NAME)) else {
                    continue;
                };
                seen += 1;
                if serde_json::from_str::<Conflist>(&config).is_err() {
                    violations.push(format!("a half-written config: {config:?}"));
                }
                match fs::read(bin.join(PLUGIN_NAME)) {
                    Ok(binary)
                        if binary.len() == PLUGIN_SIZE
                            && binary.iter().all(|b| *b == binary[0]) => {}
                    Ok(binary) => {
                        violations.push(format!("config with a {}-byte binary", binary.len()))
                    }
                    Err(e) => violations.push(format!("config without its binary: {e}")),
                }
            }
            (seen, violations)
        });
        for round in 0..6u8 {
            fs::write(&plugin, vec![round; PLUGIN_SIZE]).unwrap();
            if round % 2 == 0 {
                // From nothing: the binary must land before the config.
                cni_install::uninstall(&conf).unwrap();
                let _ = fs::remove_file(bin.join(PLUGIN_NAME));
            }
            cni_install::install(&plugin, &bin, &conf, &conflist(1400 + u32::from(round))).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        seen > 0,
        "the watcher never saw a config; the test proved nothing"
    );

    let installed = fs::read(bin.join(PLUGIN_NAME)).unwrap();
    assert_eq!(installed, vec![5u8; PLUGIN_SIZE]);
    let mode = fs::metadata(bin.join(PLUGIN_NAME))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let written: Conflist =
        serde_json::from_str(&fs::read_to_string(conf.join(CONFLIST_NAME)).unwrap()).unwrap();
    assert_eq!(written, conflist(1405));

    // No temporary files are left behind.
    let names = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&bin), [PLUGIN_NAME]);
    assert_eq!(names(&conf), [CONFLIST_NAME, "99-other.conflist"]);

    // Uninstall removes only our config: the binary stays for DEL of existing pods.
    assert!(cni_install::uninstall(&conf).unwrap());
    assert!(
        !cni_install::uninstall(&conf).unwrap(),
        "a second uninstall finds nothing"
    );
    assert_eq!(names(&conf), ["99-other.conflist"]);
    assert_eq!(names(&bin), [PLUGIN_NAME]);
}

#[test]
fn a_missing_plugin_writes_no_config() {
    let dir = TempDir::new("cni-missing");
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    let err = cni_install::install(&dir.0.join("nope"), &bin, &conf, &conflist(1450)).unwrap_err();
    assert!(matches!(err, CniInstallError::ReadPlugin { .. }), "{err}");
    assert!(
        err.to_string().contains("FAIRLEAD_AGENT_CNI_PLUGIN"),
        "{err}"
    );
    assert!(!conf.join(CONFLIST_NAME).exists());
}
