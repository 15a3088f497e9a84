//! Which region a token is signed for.
//!
//! The order: a region given to the daemon (flag, setting), then the region an AWS host name
//! spells, then the SDK's environment and profile settings. The host name comes before the
//! environment, unlike `aws rds generate-db-auth-token`, because RDS refuses a token signed
//! for any region but its own, and the environment describes the pod, not the database: EKS
//! injects `AWS_REGION` into every pod, so a database in another region would otherwise get
//! tokens that can never log in. IMDS is deliberately not asked: off EC2 it costs seconds of
//! timeouts, and a wrong guess would only produce tokens that RDS rejects.

use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;

#[derive(Debug, thiserror::Error)]
#[error(
    "no AWS region for host {host}: pass --region, set AWS_REGION, set a region in the AWS \
     profile, or use an AWS host name (RDS: NAME.ID.REGION.rds.amazonaws.com, \
     NAME.ID.rds.REGION.amazonaws.com.cn; Aurora DSQL: ID.dsql.REGION.on.aws)"
)]
pub struct RegionError {
    host: String,
}

pub async fn resolve_region(explicit: Option<&str>, host: &str) -> Result<String, RegionError> {
    let named = region_from_host(host);
    if let Some(region) = explicit.filter(|region| !region.is_empty()) {
        if let Some(named) = named.as_deref().filter(|named| *named != region) {
            tracing::warn!(
                host,
                region,
                host_region = named,
                "the region given for this host is not the one its name spells: RDS refuses \
                 tokens signed for another region than its own"
            );
        }
        return Ok(region.to_owned());
    }
    if let Some(named) = named {
        return Ok(named);
    }
    let configured = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new())
        .region()
        .await;
    configured
        .map(|region| region.as_ref().to_owned())
        .ok_or_else(|| RegionError {
            host: host.to_owned(),
        })
}

/// Where the region sits in the AWS host names a database is reached by, as the labels after
/// the instance, cluster, proxy or DSQL cluster name; `REGION` marks it. Instance, cluster
/// (`cluster-`, `cluster-ro-`, `cluster-custom-`) and RDS Proxy (`proxy-`) endpoints differ only
/// in the label before these, so one shape covers them all.
const HOST_SHAPES: &[&[&str]] = &[
    // Commercial and GovCloud (us-gov-*) RDS.
    &[REGION, "rds", "amazonaws", "com"],
    // GovCloud's service-first form.
    &["rds", REGION, "amazonaws", "com"],
    // China (cn-*): today's form, then the one older endpoints keep.
    &["rds", REGION, "amazonaws", "com", "cn"],
    &[REGION, "rds", "amazonaws", "com", "cn"],
    // Aurora DSQL in every partition.
    &["dsql", REGION, "on", "aws"],
];
/// Marks the region's label in `HOST_SHAPES`.
const REGION: &str = "";

/// The region an RDS, RDS Proxy or Aurora DSQL host name spells, e.g.
/// `db.abc.eu-west-1.rds.amazonaws.com` → `eu-west-1`. Host names are case-insensitive but
/// credential scopes are not, so the region comes out in lower case.
pub fn region_from_host(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    HOST_SHAPES.iter().find_map(|shape| {
        // At least one label (the resource's own name) before the shape.
        let start = labels.len().checked_sub(shape.len()).filter(|&n| n > 0)?;
        let mut region = None;
        for (&label, &expected) in labels[start..].iter().zip(shape.iter()) {
            if expected == REGION {
                region = Some(label);
            } else if label != expected {
                return None;
            }
        }
        region.filter(|r| looks_like_region(r)).map(str::to_owned)
    })
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`: three or more parts of letters and digits.
fn looks_like_region(label: &str) -> bool {
    label.split('-').count() >= 3
        && label
            .split('-')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::region_from_host;

    #[test]
    fn region_comes_from_rds_host_names() {
        let cases = [
            ("mydb.abc123.eu-west-1.rds.amazonaws.com", Some("eu-west-1")),
            (
                "x.cluster-ro-abc.us-east-2.rds.amazonaws.com.",
                Some("us-east-2"),
            ),
            (
                "MyDB.ABC.CN-NORTH-1.RDS.AMAZONAWS.COM.CN",
                Some("cn-north-1"),
            ),
            (
                "mydb.abc.rds.cn-northwest-1.amazonaws.com.cn",
                Some("cn-northwest-1"),
            ),
            (
                "app.cluster-abc.rds.cn-north-1.amazonaws.com.cn",
                Some("cn-north-1"),
            ),
            (
                "mydb.abc.us-gov-west-1.rds.amazonaws.com",
                Some("us-gov-west-1"),
            ),
            (
                "mydb.abc.rds.us-gov-east-1.amazonaws.com",
                Some("us-gov-east-1"),
            ),
            ("localhost", None),
            ("rds.amazonaws.com", None),
            ("us-east-1.rds.amazonaws.com", None),
            ("rds.cn-north-1.amazonaws.com.cn", None),
            ("db.example.com", None),
            ("db.notaregion.rds.amazonaws.com", None),
            ("db.us-east-1.rds.amazonaws.com.evil.example", None),
            ("db.us--1.rds.amazonaws.com", None),
        ];
        for (host, expected) in cases {
            assert_eq!(region_from_host(host).as_deref(), expected, "{host}");
        }
    }

    #[test]
    fn region_comes_from_rds_proxy_host_names_in_every_partition() {
        let cases = [
            (
                "proxy.proxy-abc.ap-southeast-2.rds.amazonaws.com",
                "ap-southeast-2",
            ),
            (
                "app-proxy.proxy-c0ffee.us-gov-west-1.rds.amazonaws.com",
                "us-gov-west-1",
            ),
            (
                "app-proxy.proxy-c0ffee.rds.cn-north-1.amazonaws.com.cn",
                "cn-north-1",
            ),
            (
                "app-proxy-ro.endpoint.proxy-c0ffee.cn-northwest-1.rds.amazonaws.com.cn",
                "cn-northwest-1",
            ),
        ];
        for (host, expected) in cases {
            assert_eq!(region_from_host(host).as_deref(), Some(expected), "{host}");
        }
    }

    #[test]
    fn region_comes_from_dsql_host_names() {
        let cases = [
            (
                "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
                Some("us-east-1"),
            ),
            ("ABC.DSQL.EU-WEST-2.ON.AWS.", Some("eu-west-2")),
            ("dsql.us-east-1.on.aws", None),
            ("abc.dsql.nowhere.on.aws", None),
            ("abc.dsql.us-east-1.on.aws.example", None),
        ];
        for (host, expected) in cases {
            assert_eq!(region_from_host(host).as_deref(), expected, "{host}");
        }
    }
}
