//! `microvmm upgrade` from the command line: the demo, its JSON report, plans from files,
//! recovery, and the errors a user sees.

use std::process::{Command, Output};

use vmm_test_guests::kvm_or_skip;

fn microvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(args)
        .output()
        .expect("run microvmm")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_demo_prints_its_timeline_and_client_line_and_json() {
    if !kvm_or_skip("the_demo_prints_its_timeline") {
        return;
    }
    let o = microvmm(&["upgrade"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    for want in [
        "clone pause:",
        "merge",
        "final catch-up",
        "cutover:",
        "client gap:",
        "0 errors, 0 out of order",
        "disk: OS version 2",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let o = microvmm(&["upgrade", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["os_version"], 2);
    assert_eq!(v["client"]["errors"], 0);
    assert!(v["report"]["phases"].as_array().unwrap().len() >= 10);
}

#[test]
fn plans_from_files_are_checked_and_a_failing_plan_rolls_back() {
    let o = microvmm(&["upgrade", "--print-plan"]);
    let (plan, _) = text(&o);
    assert!(o.status.success());
    let parsed = upgrade::UpgradePlan::from_json(&plan, std::path::Path::new("printed")).unwrap();
    assert_eq!(parsed.workload.agent_port, 1100);
    let dir = tempfile::tempdir().unwrap();
    // A misspelt field is named.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, plan.replace("\"vsock_ports\"", "\"vsock_portz\"")).unwrap();
    let o = microvmm(&["upgrade", "--plan", bad.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("vsock_portz"), "{err}");
    if !kvm_or_skip("plans_from_files_rolls_back") {
        return;
    }
    // A backup command that fails: rolled back, said so, non-zero exit.
    let mut v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    v["commands"][0]["argv"] = serde_json::json!(["false"]);
    v.as_object_mut().unwrap().remove("work_dir");
    let failing = dir.path().join("failing.json");
    std::fs::write(&failing, v.to_string()).unwrap();
    let o = microvmm(&["upgrade", "--plan", failing.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("upgrade failed in phase upgrade backup; rolled back")
            && err.contains("exited with 1"),
        "{err}"
    );
}

#[test]
fn recovery_and_linux_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = microvmm(&["upgrade", "--recover", dir.path().to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("no unfinished upgrade"), "{out}");
    // --config needs --plan, and a VM without vsock cannot reach a guest agent.
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "drives": []}"#,
    )
    .unwrap();
    let o = microvmm(&["upgrade", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let plan = dir.path().join("plan.json");
    let printed = text(&microvmm(&["upgrade", "--print-plan"])).0;
    std::fs::write(&plan, printed).unwrap();
    let o = microvmm(&[
        "upgrade",
        "--config",
        cfg.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no vsock device"), "{err}");
}
