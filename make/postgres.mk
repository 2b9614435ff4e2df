# PostgreSQL for several generation instances.
#
# `GENERATION_INSTANCES=N make run` (N > 1) without GENERATION_DATABASE_URL starts a private
# cluster under DATA_DIR/postgres with Debian's programs (initdb, postgres), and the suite's
# PostgreSQL tests start one in a temporary folder; `make install` installs the `postgresql`
# package with apt-get when they are missing. Nothing of the package's own system-wide cluster is
# used: a policy-rc.d that answers 101 keeps apt from starting it (added only when the machine
# has none, and removed again afterwards).

EXTRA_INSTALL += postgresql-install

.PHONY: postgresql-install

postgresql-install:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		SUDO=; if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		echo "installing Debian's postgresql with apt-get"; \
		ADDED_POLICY=; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && \
			$$SUDO chmod +x /usr/sbin/policy-rc.d && ADDED_POLICY=1; \
		fi; \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
		status=$$?; \
		if [ -n "$$ADDED_POLICY" ]; then $$SUDO rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$status; \
	fi
