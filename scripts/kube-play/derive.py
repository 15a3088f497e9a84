#!/usr/bin/env python3
"""Derives, from one of container/k8s/'s manifests, a Pod that `podman kube play` can run here
against the stand-in image. Prints the Pod's YAML on stdout.

What changes, and why (each is something kube play cannot do or this machine does not have):
- the Deployment's pod template becomes a bare Pod (one replica is enough to run it);
- native sidecars (init containers with restartPolicy: Always) become ordinary containers, in
  order: podman 4.3 refuses init containers that carry probes;
- container ports are dropped: kube play would publish them on the host's ports;
- every probe is dropped: kube play refuses them on init containers and has no kubelet to run
  them (no systemd timers here), so start-up ordering is not exercised;
- images point at the locally built ones (scripts/containers.sh images);
- IRSA (the ServiceAccount, its annotations) is replaced by the stand-in's static test keys;
- the database is the stand-in (host `standin`, region us-east-1) with short tokens, so that
  refreshes come within the run;
- the RDS CA bundle (a ConfigMap, or the daemon image's own file) is the stand-in's CA, from a
  host directory mounted at /etc/ssl/rds in every container that reads it;
- each emptyDir becomes a host directory made 0777, as Kubernetes makes an emptyDir (podman's
  emptyDir belongs to the pod's uid instead, which would hide how the daemon copes with a
  directory everyone can write); it is on disk, not in memory;
- the app's loop queries every half second over a new connection and logs one line per query
  ("<epoch> ok" or "<epoch> FAILED <error>"), for the verdict.
"""
import argparse
import copy
import os
import sys

import yaml

RUNTIME = "registry.example.com/aws-pgbouncer:0.1.0"
LOCAL_IMAGES = {
    "registry.example.com/aws-pgbouncer:0.1.0": "localhost/aws-pgbouncer:local",
    "registry.example.com/aws-pgbouncer:0.1.0-supervised": "localhost/aws-pgbouncer:local-supervised",
}
# The stand-in's test keys (AWS documentation examples): it trusts nothing else.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_EC2_METADATA_DISABLED": "true",
}
DATABASE = {
    "AWS_PGBOUNCER_HOST": "standin",
    "AWS_PGBOUNCER_PORT": "5432",
    "AWS_PGBOUNCER_DBNAME": "appdb",
    "AWS_PGBOUNCER_REGION": "us-east-1",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CA_DIR = "/etc/ssl/rds"
APP_LOOP = (
    "while :; do "
    'if out=$(psql -XAtq -c "SELECT current_user" 2>&1); then echo "$(date +%s.%N) ok"; '
    'else echo "$(date +%s.%N) FAILED $out" | tr "\\n" " "; echo; fi; '
    "sleep 0.5; done"
)


def set_env(container, values):
    env = [var for var in container.get("env", []) if var["name"] not in values]
    env.extend({"name": name, "value": value} for name, value in values.items())
    container["env"] = env


def host_dir_for(volume, empty_dirs):
    """A fresh 0777 host directory for an emptyDir volume."""
    path = os.path.join(empty_dirs, volume["name"])
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o777)
    return {"name": volume["name"], "hostPath": {"path": path, "type": "Directory"}}


def derive(documents, name, ca_host_dir, empty_dirs, token_lifetime, images):
    workload = next(d for d in documents if d and d.get("kind") in ("Deployment", "Job"))
    spec = copy.deepcopy(workload["spec"]["template"]["spec"])
    spec.pop("serviceAccountName", None)
    sidecars = spec.pop("initContainers", [])
    for sidecar in sidecars:
        if sidecar.pop("restartPolicy", None) != "Always":
            sys.exit(f"{sidecar['name']}: an init container that is not a native sidecar")
    spec["containers"] = sidecars + spec["containers"]
    spec["restartPolicy"] = "Always"

    volumes = [host_dir_for(v, empty_dirs) if "emptyDir" in v else v
               for v in spec.get("volumes", []) if "configMap" not in v]
    volumes.append({"name": "rds-ca-bundle", "hostPath": {"path": ca_host_dir, "type": "Directory"}})
    spec["volumes"] = volumes
    for container in spec["containers"]:
        for probe in PROBES:
            container.pop(probe, None)
        # kube play publishes container ports on the host; nothing outside the pod needs them.
        container.pop("ports", None)
        container["image"] = images.get(container["image"], container["image"])
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] != "rds-ca-bundle"]
        if container["name"] in ("aws-pgbouncer", "pgbouncer"):
            mounts.append({"name": "rds-ca-bundle", "mountPath": CA_DIR, "readOnly": True})
        container["volumeMounts"] = mounts
        if container["name"] == "aws-pgbouncer":
            set_env(container, {**DATABASE, **TEST_CREDENTIALS,
                                "AWS_PGBOUNCER_TOKEN_LIFETIME": str(token_lifetime),
                                "AWS_PGBOUNCER_LOG_FORMAT": "text"})
        if container["name"] == "app":
            container["command"] = ["/bin/sh", "-c", APP_LOOP]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "aws-pgbouncer-kube-play"}},
        "spec": spec,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--name", required=True, help="the Pod's name")
    parser.add_argument("--ca-dir", required=True, help="host directory holding global-bundle.pem")
    parser.add_argument("--empty-dirs", required=True,
                        help="host directory under which each emptyDir gets a 0777 directory")
    parser.add_argument("--token-lifetime", type=int, default=20)
    parser.add_argument("--runtime-image", help="instead of " + LOCAL_IMAGES[RUNTIME])
    args = parser.parse_args()
    with open(args.manifest) as file:
        documents = list(yaml.safe_load_all(file))
    images = dict(LOCAL_IMAGES)
    if args.runtime_image:
        images[RUNTIME] = args.runtime_image
    pod = derive(documents, args.name, args.ca_dir, args.empty_dirs, args.token_lifetime, images)
    yaml.safe_dump(pod, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
