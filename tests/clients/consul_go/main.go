// A Go Consul client (Debian's golang-github-armon-consul-api-dev, the
// package hashicorp/consul/api grew from) against two meshd agents.
//
//	consul_go 127.0.0.1:PORT_A 127.0.0.1:PORT_B
//
// Built and run by tests/test_e2e_consul_go.py, which checks what this
// prints: one JSON object, a key per step, each the value the client decoded
// into its typed structs (or {"error": ...} when it returned one).  Go's
// decoder refuses a field of the wrong JSON type, which Python and Node.js
// clients let through.  Every wait is bounded; the program exits by itself.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	consulapi "github.com/armon/consul-api"
)

type result map[string]interface{}

func fail(err error) result { return result{"error": err.Error()} }

func client(addr string) *consulapi.Client {
	c, err := consulapi.NewClient(&consulapi.Config{Address: addr})
	if err != nil {
		panic(err)
	}
	return c
}

func main() {
	a, b := client(os.Args[1]), client(os.Args[2])
	out := map[string]interface{}{}

	if self, err := a.Agent().Self(); err != nil {
		out["self"] = fail(err)
	} else {
		out["self"] = self
	}
	if name, err := a.Agent().NodeName(); err != nil {
		out["node_name"] = fail(err)
	} else {
		out["node_name"] = name
	}
	if members, err := b.Agent().Members(false); err != nil {
		out["members"] = fail(err)
	} else {
		out["members"] = members
	}
	if leader, err := a.Status().Leader(); err != nil {
		out["leader"] = fail(err)
	} else {
		out["leader"] = leader
	}
	if dcs, err := b.Catalog().Datacenters(); err != nil {
		out["datacenters"] = fail(err)
	} else {
		out["datacenters"] = dcs
	}

	reg := &consulapi.AgentServiceRegistration{
		ID: "orders-1", Name: "orders", Tags: []string{"v1"}, Port: 3500,
		Check: &consulapi.AgentServiceCheck{TTL: "30s"},
	}
	if err := a.Agent().ServiceRegister(reg); err != nil {
		out["register"] = fail(err)
	} else {
		out["register"] = "ok"
	}
	if err := a.Agent().PassTTL("service:orders-1", "fine"); err != nil {
		out["pass_ttl"] = fail(err)
	} else {
		out["pass_ttl"] = "ok"
	}
	if services, err := a.Agent().Services(); err != nil {
		out["services"] = fail(err)
	} else {
		out["services"] = services
	}
	if checks, err := a.Agent().Checks(); err != nil {
		out["checks"] = fail(err)
	} else {
		out["checks"] = checks
	}

	// Passing on B once gossip brings it, then a blocking query on B that a
	// deregistration on A wakes.
	var index uint64
	deadline := time.Now().Add(30 * time.Second)
	for {
		entries, meta, err := b.Health().Service("orders", "", true, nil)
		if err != nil {
			out["passing_on_b"] = fail(err)
			break
		}
		if len(entries) > 0 {
			out["passing_on_b"] = entries
			index = meta.LastIndex
			break
		}
		if time.Now().After(deadline) {
			out["passing_on_b"] = fail(fmt.Errorf("timed out waiting for orders-1 on B"))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if nodes, _, err := b.Catalog().Service("orders", "", nil); err != nil {
		out["catalog_service"] = fail(err)
	} else {
		out["catalog_service"] = nodes
	}
	if services, _, err := b.Catalog().Services(nil); err != nil {
		out["catalog_services"] = fail(err)
	} else {
		out["catalog_services"] = services
	}
	if nodes, _, err := b.Catalog().Nodes(nil); err != nil {
		out["catalog_nodes"] = fail(err)
	} else {
		out["catalog_nodes"] = nodes
	}
	if node, _, err := b.Catalog().Node("na", nil); err != nil {
		out["catalog_node"] = fail(err)
	} else {
		out["catalog_node"] = node
	}
	if checks, _, err := b.Health().Checks("orders", nil); err != nil {
		out["health_checks"] = fail(err)
	} else {
		out["health_checks"] = checks
	}
	if checks, _, err := b.Health().Node("na", nil); err != nil {
		out["health_node"] = fail(err)
	} else {
		out["health_node"] = checks
	}
	if checks, _, err := b.Health().State("passing", nil); err != nil {
		out["health_state"] = fail(err)
	} else {
		out["health_state"] = checks
	}

	// A check added to a service registered without one, then removed.
	web := &consulapi.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080}
	if err := a.Agent().ServiceRegister(web); err != nil {
		out["register_web"] = fail(err)
	}
	check := &consulapi.AgentCheckRegistration{ID: "web-ttl", Name: "web alive"}
	check.TTL = "15s"
	// This old client has no ServiceID field: the check names no service,
	// which meshd refuses (it runs checks for services only).
	if err := a.Agent().CheckRegister(check); err != nil {
		out["check_register_without_service"] = fail(err)
	} else {
		out["check_register_without_service"] = "ok"
	}
	if err := a.Agent().CheckDeregister("web-ttl"); err != nil {
		out["check_deregister_unknown"] = fail(err)
	} else {
		out["check_deregister_unknown"] = "ok"
	}

	// What meshd does not do: an error, never a value read as "no such key".
	if pair, _, err := a.KV().Get("config/x", nil); err != nil {
		out["kv_get"] = fail(err)
	} else {
		out["kv_get"] = pair
	}

	// A blocking query loop as clients run it: meshd's index counts every
	// change on the agent, so an answer for an unrelated one just re-blocks.
	if _, meta, err := b.Health().Service("orders", "", true, nil); err == nil {
		index = meta.LastIndex
	}
	woke := make(chan interface{}, 1)
	go func() {
		idx := index
		until := time.Now().Add(25 * time.Second)
		for time.Now().Before(until) {
			entries, meta, err := b.Health().Service("orders", "", true, &consulapi.QueryOptions{
				WaitIndex: idx, WaitTime: 20 * time.Second,
			})
			if err != nil {
				woke <- fail(err)
				return
			}
			if len(entries) == 0 {
				woke <- entries
				return
			}
			idx = meta.LastIndex
		}
		woke <- fail(fmt.Errorf("orders-1 never went"))
	}()
	time.Sleep(500 * time.Millisecond) // let the query block first
	started := time.Now()
	if err := a.Agent().ServiceDeregister("orders-1"); err != nil {
		out["deregister"] = fail(err)
	}
	select {
	case v := <-woke:
		out["blocking_query"] = v
		out["blocking_query_seconds"] = time.Since(started).Seconds()
	case <-time.After(30 * time.Second):
		out["blocking_query"] = fail(fmt.Errorf("the blocking query did not return"))
	}

	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		panic(err)
	}
}
