//! `deploy/` stays true to the daemon: every TOML and YAML file parses, and the ports,
//! paths and flags they use exist in `flotillad` and agree with each other.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla::config::{FileConfig, TokensFile, check_tokens};
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files_with(ext: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/").flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, ext, out);
            } else if p.extension().is_some_and(|e| e == ext) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), ext, &mut out);
    out.sort();
    out
}

/// Every `--flag` the daemon's help (or a subcommand's) names.
fn flags(subcommand: Option<&str>) -> BTreeSet<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotillad"));
    if let Some(s) = subcommand {
        cmd.arg(s);
    }
    let out = cmd.arg("--help").output().expect("flotillad --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

fn assert_flags_exist(words: &[String], known: &BTreeSet<String>, origin: &str) {
    let used: Vec<&String> = words.iter().filter(|w| w.starts_with("--")).collect();
    assert!(!used.is_empty(), "{origin}: no flags found to check");
    for flag in used {
        let name = flag.split('=').next().unwrap_or(flag);
        assert!(
            known.contains(name),
            "{origin} uses {name}, which flotillad does not have"
        );
    }
}

/// The value after `flag` in an argument list.
fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

#[test]
fn every_toml_file_is_a_config_or_a_tokens_file() {
    let files = files_with("toml");
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        if text.contains("[[tokens]]") && !text.contains("listen") {
            let tokens: TokensFile =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(!tokens.tokens.is_empty(), "{}", file.display());
            check_tokens(&tokens.tokens).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        } else {
            let config = FileConfig::load(&file).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                config.listen.is_some(),
                "{}: says where it listens",
                file.display()
            );
        }
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_daemon_and_each_other() {
    let files = files_with("yaml");
    assert!(!files.is_empty());
    let daemon_flags = flags(None);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| {
                serde::Deserialize::deserialize(d)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            })
            .collect();
        let kind = |k: &str| {
            docs.iter()
                .find(|d| d["kind"] == k)
                .unwrap_or_else(|| panic!("no {k} in {}", file.display()))
        };
        let config_map = kind("ConfigMap");
        let secret = kind("Secret");
        let service = kind("Service");
        let set = kind("StatefulSet");

        let config_text = config_map["data"]["flotillad.toml"]
            .as_str()
            .expect("flotillad.toml in the ConfigMap");
        let config: FileConfig =
            toml::from_str(config_text).expect("the ConfigMap's config parses");
        let tokens_text = secret["stringData"]["tokens.toml"]
            .as_str()
            .expect("tokens.toml in the Secret");
        let tokens: TokensFile = toml::from_str(tokens_text).expect("the Secret's tokens parse");
        check_tokens(&tokens.tokens).expect("valid token hashes");

        assert_eq!(
            set["spec"]["replicas"].as_u64(),
            Some(1),
            "one daemon per data dir"
        );
        let pod = &set["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let words: Vec<String> = container["command"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(container["args"].as_sequence().into_iter().flatten())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        assert_flags_exist(&words, &daemon_flags, "the StatefulSet");

        let ports: Vec<(String, u64)> = container["ports"]
            .as_sequence()
            .expect("container ports")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("").to_string(),
                    p["containerPort"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let port_named = |name: &str| ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
        let grpc = config.listen.expect("listen").port();
        assert_eq!(
            port_named("grpc"),
            Some(u64::from(grpc)),
            "grpc port = config listen"
        );
        let metrics = config.metrics_listen.expect("metrics_listen").port();
        assert_eq!(
            port_named("metrics"),
            Some(u64::from(metrics)),
            "metrics port = config"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["grpc"]["port"].as_u64(),
                Some(u64::from(grpc)),
                "{probe} checks gRPC health"
            );
        }
        for p in service["spec"]["ports"]
            .as_sequence()
            .expect("service ports")
        {
            let target = p["targetPort"].as_str().expect("named targetPort");
            assert!(
                port_named(target).is_some(),
                "Service targets a container port {target}"
            );
        }
        assert!(
            container["resources"]["requests"]["memory"].is_string(),
            "resource requests"
        );

        let mounts = container["volumeMounts"].as_sequence().expect("mounts");
        let mount_of = |volume: &str| {
            mounts
                .iter()
                .find(|m| m["name"] == volume)
                .and_then(|m| m["mountPath"].as_str())
                .unwrap_or_else(|| panic!("no mount of {volume}"))
                .to_string()
        };
        let data_dir = config.data_dir.expect("data_dir");
        assert_eq!(
            Path::new(&mount_of("data")),
            data_dir,
            "the PVC holds the data dir"
        );
        let claims = set["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .expect("a PVC template");
        assert!(claims.iter().any(|c| c["metadata"]["name"] == "data"));
        let config_path = flag_value(&words, "--config").expect("--config");
        assert_eq!(
            mount_of("config"),
            config_path,
            "the ConfigMap is mounted where --config points"
        );
        let tokens_file = config.tokens_file.expect("tokens_file");
        assert_eq!(
            Path::new(&mount_of("tokens")),
            tokens_file.parent().expect("dir"),
            "the Secret holds tokens_file"
        );
        assert_eq!(
            tokens_file.file_name().and_then(|f| f.to_str()),
            Some("tokens.toml")
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    }
}

#[test]
fn systemd_unit_is_hardened_and_uses_real_flags() {
    let text = std::fs::read_to_string(deploy().join("systemd/flotillad.service")).expect("unit");
    let values = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    let exec: Vec<String> = values("ExecStart")
        .first()
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(exec[0].ends_with("/flotillad"), "{exec:?}");
    assert_flags_exist(&exec, &flags(None), "ExecStart");
    let state = values("StateDirectory");
    assert_eq!(state.len(), 1);
    assert_eq!(
        flag_value(&exec, "--data-dir"),
        Some(format!("/var/lib/{}", state[0]).as_str()),
        "the data dir is the StateDirectory"
    );
    assert_eq!(values("ProtectSystem"), ["strict"]);
    assert!(values("DynamicUser") == ["yes"] || !values("User").is_empty());
    assert!(!values("Restart").is_empty());
    assert_eq!(values("KillSignal"), ["SIGTERM"], "SIGTERM is what drains");
    let config = flag_value(&exec, "--config").expect("--config");
    let example: FileConfig = FileConfig::load(&deploy().join("flotillad.toml")).expect("example");
    assert!(config.ends_with("flotillad.toml"), "{config}");
    assert!(example.listen.is_some());
}

#[test]
fn dockerfile_runs_as_non_root_with_a_volume_and_a_grpc_health_check() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).expect("Dockerfile");
    // Join continuation lines so each instruction is one line.
    let joined = text.replace("\\\n", " ");
    let instruction = |name: &str| -> Vec<String> {
        joined
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_string)
            .collect()
    };
    let json_words = |s: &str| -> Vec<String> {
        let start = s.find('[').expect("exec form");
        serde_json::from_str(&s[start..]).expect("a JSON array")
    };
    assert!(instruction("FROM").len() >= 2, "multi-stage");
    let user = instruction("USER");
    assert!(
        user.last()
            .is_some_and(|u| !u.starts_with("root") && !u.starts_with('0')),
        "{user:?}"
    );
    let entry = json_words(&instruction("ENTRYPOINT")[0]);
    let cmd = json_words(&instruction("CMD").last().expect("CMD").clone());
    let words: Vec<String> = entry.iter().chain(&cmd).cloned().collect();
    assert_flags_exist(&words, &flags(None), "ENTRYPOINT + CMD");
    let data_dir = flag_value(&words, "--data-dir").expect("--data-dir");
    assert!(
        instruction("VOLUME")[0].contains(data_dir),
        "the data dir is a volume"
    );
    let exposed: Vec<u16> = instruction("EXPOSE")
        .iter()
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().expect("port"))
        })
        .collect();
    assert!(exposed.contains(&port(flag_value(&words, "--listen").expect("--listen"))));
    assert!(exposed.contains(&port(
        flag_value(&words, "--metrics-listen").expect("--metrics-listen")
    )));
    let health = instruction("HEALTHCHECK");
    let check = json_words(&health[0]);
    assert_eq!(&check[..2], ["flotillad", "healthcheck"]);
    assert_flags_exist(&check[2..], &flags(Some("healthcheck")), "HEALTHCHECK");
    let addr = flag_value(&check, "--addr").expect("--addr");
    assert_eq!(
        port(addr),
        port(flag_value(&words, "--listen").expect("listen"))
    );
}
