# The Studio page (gateway/static/) and its browser tests.
#
# - three.js from npm, the few modules the viewer imports copied into
#   gateway/static/vendor/ (git ignores it and node_modules/);
# - Debian's chromium for the browser tests, installed only when missing:
#   Playwright's own browser download cannot work here (no internet), so the
#   tests drive /usr/bin/chromium. Playwright itself is pinned in
#   requirements.txt and installed with the rest of the venv.

STUDIO_VENDOR := gateway/static/vendor
STUDIO_VENDOR_STAMP := $(STUDIO_VENDOR)/.installed
NPM_STAMP := node_modules/.installed
CHROMIUM := /usr/bin/chromium
# Paths under node_modules/three/, kept as they are so their relative imports hold.
THREE_FILES := build/three.module.js build/three.core.js \
	examples/jsm/loaders/GLTFLoader.js examples/jsm/controls/OrbitControls.js \
	examples/jsm/utils/BufferGeometryUtils.js examples/jsm/utils/SkeletonUtils.js LICENSE

# CI runs as root; a developer's own account goes through sudo.
STUDIO_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

EXTRA_INSTALL += $(STUDIO_VENDOR_STAMP) $(CHROMIUM)

.PHONY: studio-vendor

studio-vendor: $(STUDIO_VENDOR_STAMP)

$(NPM_STAMP): package.json package-lock.json
	command -v npm >/dev/null || { $(STUDIO_SUDO) apt-get update -qq && \
		$(STUDIO_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(STUDIO_VENDOR_STAMP): $(NPM_STAMP) make/studio.mk
	rm -rf $(STUDIO_VENDOR)/three
	for f in $(THREE_FILES); do \
		mkdir -p $(STUDIO_VENDOR)/three/$$(dirname $$f) && cp node_modules/three/$$f $(STUDIO_VENDOR)/three/$$f || exit 1; \
	done
	touch $@

# A file target: once chromium is there, make does nothing.
$(CHROMIUM):
	$(STUDIO_SUDO) apt-get update -qq
	$(STUDIO_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
