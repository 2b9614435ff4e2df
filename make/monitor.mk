# Monitoring, load test and benchmarks.
#
#   make monitor    Debian's prometheus on 127.0.0.1:$(PROMETHEUS_PORT), scraping the
#                   gateway and both services' metrics ports (deploy/prometheus.yml);
#                   installs it with apt-get when missing. Ctrl-C stops it.
#   make loadtest   bench/loadtest.py: a bounded load test against a stack of its own
#                   on free loopback ports (LOADTEST_ARGS=--url http://127.0.0.1:5000
#                   to aim at a running one); reports under bench/.
#   make bench      bench/run.py: the benchmark suite; results in bench/RESULTS.md.
#   make soak       bench/soak.py: a bounded chaos soak (SOAK_S seconds, default 600) on loopback,
#                   faults injected at random; report in bench/SOAK.md. SOAK_INSTANCES=2: a cluster
#                   of two generation instances on PostgreSQL, report in bench/SOAK_CLUSTER.md.
#
# `make install` runs prometheus-install (EXTRA_INSTALL) because a test of
# `make test` starts that Prometheus; once installed it costs one `command -v`.

PROMETHEUS_PORT ?= 9090
GENERATION_METRICS_PORT ?= 9101
TELEMETRY_METRICS_PORT ?= 9102
PROMETHEUS_DIR = $(DATA_DIR)/prometheus
LOADTEST_ARGS ?=
BENCH_ARGS ?=

EXTRA_INSTALL += prometheus-install

SOAK_S ?= 600
SOAK_INSTANCES ?= 1

.PHONY: monitor prometheus-install loadtest bench soak

# The Debian package's post-install script would start a system-wide Prometheus
# listening on every interface; a policy-rc.d that answers 101 stops that (it is
# only added when the machine has none, and removed again afterwards).
prometheus-install:
	@if ! command -v prometheus >/dev/null 2>&1 && ! test -x /usr/bin/prometheus; then \
		SUDO=; if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		echo "installing Debian's prometheus with apt-get"; \
		ADDED_POLICY=; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && \
			$$SUDO chmod +x /usr/sbin/policy-rc.d && ADDED_POLICY=1; \
		fi; \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
		status=$$?; \
		if [ -n "$$ADDED_POLICY" ]; then $$SUDO rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$status; \
	fi

monitor: prometheus-install
	mkdir -p $(PROMETHEUS_DIR)/data
	sed -e 's/127\.0\.0\.1:5000/127.0.0.1:$(GATEWAY_PORT)/' \
		-e 's/127\.0\.0\.1:9101/127.0.0.1:$(GENERATION_METRICS_PORT)/' \
		-e 's/127\.0\.0\.1:9102/127.0.0.1:$(TELEMETRY_METRICS_PORT)/' \
		deploy/prometheus.yml > $(PROMETHEUS_DIR)/prometheus.yml
	@echo "Prometheus on http://127.0.0.1:$(PROMETHEUS_PORT)/ (config $(PROMETHEUS_DIR)/prometheus.yml)"
	exec prometheus --config.file=$(PROMETHEUS_DIR)/prometheus.yml \
		--storage.tsdb.path=$(PROMETHEUS_DIR)/data \
		--web.listen-address=127.0.0.1:$(PROMETHEUS_PORT)

loadtest: install
	$(BIN)/python -m bench.loadtest $(LOADTEST_ARGS)

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

soak: install
	SOAK_S=$(SOAK_S) SOAK_INSTANCES=$(SOAK_INSTANCES) $(BIN)/python -m bench.soak
