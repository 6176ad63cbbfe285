//! `loadgen cluster`: the same satchel requests against one redis-server and against
//! a three-primary Redis Cluster (no replicas: the same number of Redis processes
//! doing the work per shard), alternating runs, same process run (issue 14).
//!
//! On this 2-core machine a cluster cannot be faster: three redis-servers, the
//! daemon and the load generator share two cores, and the cluster connection does
//! more per command (slot lookup, per-node queues). The ratio shows that overhead.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use satchel::protocol::msgpack::Writer;

use crate::mail::{free_port, send_frame, start_redis, start_satchel, wait_tcp};
use crate::stats::Summary;
use crate::{Proc, rt, run_pipelined, wire};

/// Three cluster-enabled redis-servers made into one cluster; returns their ports.
fn start_cluster(dir: &Path) -> (Vec<Proc>, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for p in &ports {
        let d = dir.join(format!("node{p}"));
        std::fs::create_dir_all(&d).expect("node dir");
        let child = Command::new("redis-server")
            .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&d)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        procs.push(Proc(child));
        wait_tcp(*p);
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let ok = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli on the PATH");
    assert!(ok.success(), "redis-cli --cluster create failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all_ok = ports.iter().all(|p| {
            redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        });
        if all_ok {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never became ok");
        std::thread::sleep(Duration::from_millis(50));
    }
    (procs, ports)
}

fn encoded_str(s: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.str(s);
    w.into_vec()
}

pub fn run(duration: Duration, runs: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_redis, single_url) = start_redis(dir);
    let (_nodes, ports) = start_cluster(dir);
    let seeds = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let base = [("SATCHEL_MAIL_ENABLED", "false".to_owned())];
    let cluster_env = |near: bool| {
        vec![
            ("SATCHEL_MAIL_ENABLED", "false".to_owned()),
            ("SATCHEL_REDIS_CLUSTER_NODES", seeds.clone()),
            ("SATCHEL_CACHE_NEAR", near.to_string()),
        ]
    };
    let mut single_far = base.to_vec();
    single_far.push(("SATCHEL_CACHE_NEAR", "false".to_owned()));
    let (_s1, single) = start_satchel(dir, "single", &single_url, &base);
    let (_s2, single_nonear) = start_satchel(dir, "single-far", &single_url, &single_far);
    let (_c1, cluster) =
        start_satchel(dir, "cluster", "redis://127.0.0.1:6379", &cluster_env(true));
    let (_c2, cluster_nonear) = start_satchel(
        dir,
        "cluster-far",
        "redis://127.0.0.1:6379",
        &cluster_env(false),
    );

    let key = encoded_str("bench:key");
    let value = encoded_str(&"x".repeat(200));
    let set = wire::request_frame(1, "cache.set", &[("key", &key), ("value", &value)]);
    let get = wire::request_frame(1, "cache.get", &[("key", &key)]);
    let send = send_frame(1, "ann@example.com", None);
    println!(
        "satchel against one redis-server vs a 3-primary Redis Cluster (no replicas), one \
         connection, {runs} alternating runs of {}s per case, medians; 2 cores shared by the \
         load generator, 4 daemons and 4 redis-servers",
        duration.as_secs()
    );
    crate::stats::print_header();
    rt().block_on(async {
        // Seed the key through each deployment once.
        for s in [&single, &cluster] {
            run_pipelined(s, &set, 1, Duration::from_millis(50)).await;
        }
        let cases: [(&str, &Vec<u8>, usize, &Path, &Path); 6] = [
            (
                "cache.get, near-cache off, 1",
                &get,
                1,
                &single_nonear,
                &cluster_nonear,
            ),
            (
                "cache.get, near-cache off, 64",
                &get,
                64,
                &single_nonear,
                &cluster_nonear,
            ),
            ("cache.get, near-cache on, 64", &get, 64, &single, &cluster),
            ("cache.set, 64", &set, 64, &single, &cluster),
            ("mail.send, 1", &send, 1, &single, &cluster),
            ("mail.send, 64", &send, 64, &single, &cluster),
        ];
        for (label, frame, depth, one, many) in cases {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                a.push(run_pipelined(one, frame, depth, duration).await);
                b.push(run_pipelined(many, frame, depth, duration).await);
            }
            let a = Summary::median_of(&a);
            let b = Summary::median_of(&b);
            a.print(&format!("single: {label}"));
            b.print(&format!("cluster: {label}"));
            b.print_ratio("cluster/single", &a);
        }
    });
}
