//! The Kubernetes manifests (`container/k8s/`) run the daemon as a native sidecar (or as the
//! supervisor of PgBouncer) with one non-root uid, an in-memory shared directory, its probes,
//! and only flags and variables the binary's `--help` lists.

mod support;

use serde_norway::Value;
use std::collections::BTreeSet;
use support::packaging::{
    check_command_line, env_vars_in, get, help_of, k8s_manifests, read, str_of, strings,
};

fn seq<'a>(value: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    get(value, path)
        .and_then(Value::as_sequence)
        .map(|items| items.iter().collect())
        .unwrap_or_default()
}

// ------------------------------------------------------------------------ Kubernetes

/// The pod template of the manifest's workload: a Deployment's, a Job's or a CronJob's.
fn pod_template<'a>(path: &str, documents: &'a [Value]) -> &'a Value {
    documents
        .iter()
        .find_map(|doc| match str_of(doc, &["kind"])? {
            "Deployment" | "Job" => get(doc, &["spec", "template", "spec"]),
            "CronJob" => get(doc, &["spec", "jobTemplate", "spec", "template", "spec"]),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{path}: no Deployment, Job or CronJob"))
}

#[test]
fn kubernetes_manifests_run_native_sidecars_in_order_as_one_uid() {
    for (path, documents) in k8s_manifests() {
        let kinds: Vec<&str> = documents
            .iter()
            .filter_map(|doc| str_of(doc, &["kind"]))
            .collect();
        assert!(kinds.contains(&"ServiceAccount"), "{path}: {kinds:?}");
        let account = documents
            .iter()
            .find(|doc| str_of(doc, &["kind"]) == Some("ServiceAccount"))
            .unwrap();
        let role = str_of(
            account,
            &["metadata", "annotations", "eks.amazonaws.com/role-arn"],
        )
        .unwrap_or_else(|| panic!("{path}: the ServiceAccount has no IRSA role annotation"));
        assert!(role.starts_with("arn:aws:iam::"), "{path}: {role}");
        let text = read(&path);
        assert!(
            text.contains("Pod Identity") && text.contains("pod-identity-association"),
            "{path}: say how EKS Pod Identity differs"
        );

        let pod = pod_template(&path, &documents);
        assert_eq!(
            str_of(pod, &["serviceAccountName"]),
            str_of(account, &["metadata", "name"]),
            "{path}"
        );
        // One non-root uid for every container: the daemon's files are 0600 in a 0700 dir.
        let uid = get(pod, &["securityContext", "runAsUser"]).and_then(Value::as_u64);
        assert!(uid.is_some_and(|uid| uid != 0), "{path}: pod runAsUser");
        assert_eq!(
            get(pod, &["securityContext", "runAsNonRoot"]).and_then(Value::as_bool),
            Some(true),
            "{path}"
        );
        let sidecars = seq(pod, &["initContainers"]);
        let apps = seq(pod, &["containers"]);
        assert!(!apps.is_empty(), "{path}: no application container");
        for container in sidecars.iter().chain(&apps) {
            let name = str_of(container, &["name"]).unwrap();
            assert!(
                get(container, &["securityContext", "runAsUser"]).is_none(),
                "{path}: {name} overrides the pod's uid"
            );
        }
        for sidecar in &sidecars {
            assert_eq!(
                str_of(sidecar, &["restartPolicy"]),
                Some("Always"),
                "{path}: {} is not a native sidecar",
                str_of(sidecar, &["name"]).unwrap()
            );
        }

        // The daemon comes first (a native sidecar) or runs PgBouncer itself (an ordinary
        // container, --supervise), serves HTTP beyond loopback (the kubelet probes the pod
        // IP), and is probed for readiness and liveness.
        let named = |container: &&Value| str_of(container, &["name"]) == Some("aws-pgbouncer");
        let daemon = match sidecars.first() {
            Some(first) => *first,
            None => apps
                .iter()
                .copied()
                .find(named)
                .unwrap_or_else(|| panic!("{path}: no aws-pgbouncer container")),
        };
        assert!(
            named(&daemon),
            "{path}: the first sidecar is not aws-pgbouncer"
        );
        let env = |container: &Value, name: &str| -> Option<String> {
            seq(container, &["env"])
                .into_iter()
                .find(|var| str_of(var, &["name"]) == Some(name))
                .and_then(|var| str_of(var, &["value"]).map(str::to_owned))
        };
        let http = env(daemon, "AWS_PGBOUNCER_HTTP_LISTEN")
            .unwrap_or_else(|| panic!("{path}: the kubelet cannot reach 127.0.0.1:9090"));
        assert!(http.starts_with("0.0.0.0:"), "{path}: {http}");
        let port: u64 = http.rsplit(':').next().unwrap().parse().unwrap();
        let probe = |container: &Value, kind: &str| -> Option<(String, u64)> {
            let get_probe = get(container, &[kind, "httpGet"])?;
            Some((
                str_of(get_probe, &["path"])?.to_owned(),
                get(get_probe, &["port"])?.as_u64()?,
            ))
        };
        assert_eq!(
            probe(daemon, "readinessProbe"),
            Some(("/readyz".into(), port)),
            "{path}"
        );
        assert_eq!(
            probe(daemon, "livenessProbe"),
            Some(("/healthz".into(), port)),
            "{path}"
        );
        if let Some(last) = sidecars.last() {
            // The last sidecar's startup probe is /startupz: the app starts only after
            // PgBouncer has the first tokens.
            assert_eq!(
                probe(last, "startupProbe"),
                Some(("/startupz".into(), port)),
                "{path}: {} must gate the app on /startupz",
                str_of(last, &["name"]).unwrap()
            );
        } else {
            // Ordinary containers start together and a Job ends only when all have exited:
            // the daemon runs PgBouncer itself, so that it ends with it, and every other
            // container waits for /startupz and ends the daemon when done.
            let mut args = strings(get(daemon, &["args"]));
            args.extend(strings(get(daemon, &["command"])));
            assert!(args.iter().any(|arg| arg == "--supervise"), "{path}");
            for app in apps.iter().filter(|container| !named(container)) {
                let script = strings(get(app, &["command"])).join(" ");
                let polls = format!("http://127.0.0.1:{port}/startupz");
                let quits = format!("--post-data= http://127.0.0.1:{port}/quitquitquit");
                assert!(
                    script.contains(&polls) && script.contains(&quits),
                    "{path}: the app must wait for {polls} and end with {quits}: {script}"
                );
                assert_eq!(
                    env(daemon, "AWS_PGBOUNCER_QUITQUITQUIT").as_deref(),
                    Some("true"),
                    "{path}"
                );
            }
        }
        if sidecars.len() > 1 {
            // The daemon cannot report /startupz before PgBouncer runs: gating PgBouncer's
            // start on it would deadlock.
            assert_ne!(
                probe(daemon, "startupProbe").map(|(path, _)| path),
                Some("/startupz".into()),
                "{path}"
            );
        }

        // The shared directory: an in-memory emptyDir, mounted at one path in every sidecar.
        let volume = seq(pod, &["volumes"])
            .into_iter()
            .find(|volume| str_of(volume, &["emptyDir", "medium"]) == Some("Memory"))
            .unwrap_or_else(|| panic!("{path}: no emptyDir with medium Memory"));
        let volume_name = str_of(volume, &["name"]).unwrap();
        let with_daemon = [daemon];
        let sharing = match sidecars.is_empty() {
            true => &with_daemon[..],
            false => &sidecars[..],
        };
        let mount_paths: BTreeSet<&str> = sharing
            .iter()
            .map(|sidecar| {
                seq(sidecar, &["volumeMounts"])
                    .into_iter()
                    .find(|mount| str_of(mount, &["name"]) == Some(volume_name))
                    .and_then(|mount| str_of(mount, &["mountPath"]))
                    .unwrap_or_else(|| panic!("{path}: a sidecar lacks {volume_name}"))
            })
            .collect();
        assert_eq!(
            mount_paths,
            BTreeSet::from(["/run/aws-pgbouncer"]),
            "{path}: the files name each other by absolute path"
        );

        // Flags and variables of the daemon exist in its --help.
        let (_, vars) = help_of("run");
        let mut args = strings(get(daemon, &["command"]));
        args.extend(strings(get(daemon, &["args"])));
        check_command_line(&format!("{path}: aws-pgbouncer"), &args);
        for container in sidecars.iter().chain(&apps) {
            for var in seq(container, &["env"]) {
                let name = str_of(var, &["name"]).unwrap();
                if name.starts_with("AWS_PGBOUNCER_") {
                    assert!(vars.contains(name), "{path}: {name} is not in run --help");
                }
            }
        }
        for var in env_vars_in(&text) {
            assert!(vars.contains(&var), "{path}: {var} is not in run --help");
        }
    }
}
