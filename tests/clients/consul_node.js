// The npm `consul` client (Node.js) against two meshd agents' Consul API.
//
//     node consul_node.js http://127.0.0.1:PORT_A http://127.0.0.1:PORT_B
//
// Run by tests/test_e2e_consul_node.py, which installs the client and checks
// what this prints: one JSON object, a key per step, each the value the
// client returned (or {"error": ..., "status": ...} when it threw).  Every
// wait is bounded; the script exits by itself.
"use strict";

const Consul = require("consul");

const [urlA, urlB] = process.argv.slice(2);
const client = (url) => {
  const u = new URL(url);
  return new Consul({ host: u.hostname, port: u.port });
};
const a = client(urlA);
const b = client(urlB);
const out = {};

async function step(name, fn) {
  try {
    out[name] = await fn();
  } catch (err) {
    out[name] = {
      error: String(err.message || err),
      status: err.response ? err.response.statusCode : null,
    };
  }
}

async function until(what, fn, seconds) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function passing(consul) {
  return consul.health.service({ service: "orders", passing: true });
}

// A watch is a blocking-query loop: it reports the first answer, then each
// change.  `act` runs once the first answer is in (so the change it makes
// must wake a blocked query); resolved with the first answer for which
// `done` holds.
function watchUntil(consul, act, done, seconds) {
  return new Promise((resolve, reject) => {
    const watch = consul.watch({
      method: consul.health.service,
      options: { service: "orders", passing: true, wait: "20s" },
      maxAttempts: 3,
    });
    let answers = 0;
    const finish = (err, data) => {
      clearTimeout(timer);
      watch.end();
      if (err) reject(err);
      else resolve({ answers, last: data });
    };
    const timer = setTimeout(() => finish(new Error("the watch saw no change")), seconds * 1000);
    watch.on("change", (data) => {
      answers += 1;
      if (answers === 1) {
        act().catch((err) => finish(err));
      } else if (done(data)) {
        finish(null, data);
      }
    });
    watch.on("error", (err) => finish(err));
  });
}

async function main() {
  await step("leader", () => a.status.leader());
  await step("peers", () => a.status.peers());
  await step("self", () => a.agent.self());
  await step("members", () => b.agent.members());
  await step("datacenters", () => b.catalog.datacenters());

  await step("register", () =>
    a.agent.service.register({
      name: "orders",
      id: "orders-1",
      address: "127.0.0.1",
      port: 3500,
      tags: ["v1"],
      meta: { DAPR_PORT: "50001" },
      check: { ttl: "30s" },
    }),
  );
  await step("passing_before_ttl", () => passing(a));
  await step("ttl_pass", () => a.agent.check.pass("service:orders-1"));
  await step("services_on_a", () => a.agent.service.list());
  await step("checks_on_a", () => a.agent.check.list());
  await step("passing_on_b", () =>
    until("orders-1 passing on B", async () => {
      const rows = await passing(b);
      return rows.length ? rows : null;
    }, 30),
  );
  await step("catalog_services", () => b.catalog.service.list());
  await step("catalog_nodes_of_orders", () => b.catalog.service.nodes("orders"));
  await step("catalog_nodes", () => b.catalog.node.list());
  await step("health_checks", () => b.health.checks("orders"));
  await step("health_state", () => b.health.state("passing"));

  // A check added to a service registered without one, then removed.
  await step("register_web", () =>
    a.agent.service.register({ name: "web", id: "web-1", address: "127.0.0.1", port: 8080 }),
  );
  await step("check_register", () =>
    a.agent.check.register({ id: "web-ttl", name: "web alive", serviceid: "web-1", ttl: "15s" }),
  );
  await step("check_fail", () => a.agent.check.fail("web-ttl"));
  await step("web_health_failed", () => a.health.service("web"));
  await step("check_deregister", () => a.agent.check.deregister("web-ttl"));
  await step("web_health_after", () => a.health.service("web"));

  // What meshd does not do answers 501, never a 404 read as "no such key".
  await step("kv_get", () => a.kv.get("config/x"));

  // A watch on B sees orders-1 go when A deregisters it.
  await step("watch_sees_deregistration", () =>
    watchUntil(
      b,
      () => a.agent.service.deregister("orders-1"),
      (rows) => rows.length === 0,
      30,
    ),
  );
  await step("deregister_unknown", () => a.agent.service.deregister("orders-1"));

  a.destroy();
  b.destroy();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ fatal: String(err && err.stack) }) + "\n");
  process.exitCode = 1;
});
