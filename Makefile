# Basalt: `make demo` and `make test` work on a fresh machine; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

ETCD_PACKAGES := etcd-server etcd-client
# Host tools of image builds and VM tests: squashfs, initramfs compression, the ESP
# (mkfs.fat + mtools), qcow2 (qemu-img), QEMU with OVMF, sgdisk for the GPT tests, and
# strip (binutils) for wheels' unstripped extension modules; gcc and libc6-dev build the
# static stand-in programs of the custom-extension tests (tests/fixtures/extensions).
IMAGE_PACKAGES := squashfs-tools zstd dosfstools mtools qemu-utils qemu-system-x86 ovmf gdisk \
                  binutils gcc libc6-dev
POLICY_RC_D   := /usr/sbin/policy-rc.d

# Control planes run Debian's etcd. Installed only when etcd or etcdctl is missing, and
# the package must not start a system etcd: a policy-rc.d that answers 101 ("action
# forbidden") stands in for the install (any existing one is put back afterwards), and an
# etcd that still appears during the install is stopped; one that ran before is left alone.
define INSTALL_ETCD
command -v etcd >/dev/null && command -v etcdctl >/dev/null || { \
  if [ "$$(id -u)" != 0 ]; then \
    echo "Basalt needs etcd and etcdctl: install the Debian packages $(ETCD_PACKAGES) as root" \
      "(apt-get install $(ETCD_PACKAGES)), then run make again" >&2; \
    exit 1; \
  fi; \
  before=" $$(pgrep -x etcd | tr '\n' ' ')"; \
  saved=; \
  if [ -e $(POLICY_RC_D) ]; then saved=$$(mktemp); cp -p $(POLICY_RC_D) "$$saved"; fi; \
  restored=; \
  restore() { \
    [ -z "$$restored" ] || return 0; restored=1; \
    if [ -n "$$saved" ]; then mv -f "$$saved" $(POLICY_RC_D); else rm -f $(POLICY_RC_D); fi; \
  }; \
  trap restore EXIT; trap 'restore; exit 130' INT TERM; \
  printf '#!/bin/sh\nexit 101\n' > $(POLICY_RC_D) && chmod 755 $(POLICY_RC_D); \
  apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq $(ETCD_PACKAGES) || exit 1; \
  restore; \
  started=; \
  for pid in $$(pgrep -x etcd); do \
    case "$$before" in *" $$pid "*) ;; *) started="$$started $$pid";; esac; \
  done; \
  if [ -n "$$started" ]; then \
    echo "the $(ETCD_PACKAGES) install started etcd ($$started); stopping it" >&2; \
    if [ -d /run/systemd/system ]; then systemctl stop etcd.service 2>/dev/null || true; fi; \
    for pid in $$started; do kill "$$pid" 2>/dev/null || true; done; \
    sleep 1; \
    for pid in $$(pgrep -x etcd); do \
      case "$$started " in *" $$pid "*) kill -9 "$$pid" 2>/dev/null || true;; esac; \
    done; \
  fi; \
  command -v systemctl >/dev/null && systemctl disable --quiet etcd.service 2>/dev/null; \
  command -v etcd >/dev/null && command -v etcdctl >/dev/null || { \
    echo "installed $(ETCD_PACKAGES) but etcd or etcdctl is still missing" >&2; exit 1; }; \
}
endef

.PHONY: install system-deps demo test lint typecheck unit integration fuzz vm-smoke vm-test vm-cuts docs docs-check bench bench-boot image image-deps clean

$(STAMP): pyproject.toml image.lock scripts/lock_constraints.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
	  || { echo "Basalt needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	@# The wheels image.lock pins (what the image carries) constrain the venv too.
	$(PYTHON) scripts/lock_constraints.py image.lock > $(VENV)/constraints.txt
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install -q \
	  --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev,fleet]'
	@touch $@

# The runtime-lane tests run Debian's containerd and runc (as the image does). Installed
# only when missing, as root, with the same policy-rc.d stand-in as etcd so that the
# package starts no system containerd; one that still appears during the install is
# stopped (one that ran before is left alone). Without root those tests skip.
CONTAINERD_PACKAGES := containerd runc
define INSTALL_CONTAINERD
{ command -v containerd >/dev/null && command -v runc >/dev/null; } || [ "$$(id -u)" != 0 ] || { \
  before=" $$(pgrep -x containerd | tr '\n' ' ')"; \
  saved=; \
  if [ -e $(POLICY_RC_D) ]; then saved=$$(mktemp); cp -p $(POLICY_RC_D) "$$saved"; fi; \
  restored=; \
  restore() { \
    [ -z "$$restored" ] || return 0; restored=1; \
    if [ -n "$$saved" ]; then mv -f "$$saved" $(POLICY_RC_D); else rm -f $(POLICY_RC_D); fi; \
  }; \
  trap restore EXIT; trap 'restore; exit 130' INT TERM; \
  printf '#!/bin/sh\nexit 101\n' > $(POLICY_RC_D) && chmod 755 $(POLICY_RC_D); \
  apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends $(CONTAINERD_PACKAGES) || exit 1; \
  restore; \
  for pid in $$(pgrep -x containerd); do \
    case "$$before" in *" $$pid "*) ;; *) \
      echo "the $(CONTAINERD_PACKAGES) install started containerd ($$pid); stopping it" >&2; \
      if [ -d /run/systemd/system ]; then systemctl stop containerd.service 2>/dev/null || true; fi; \
      kill "$$pid" 2>/dev/null || true;; \
    esac; \
  done; \
  command -v systemctl >/dev/null && systemctl disable --quiet containerd.service 2>/dev/null; \
  command -v containerd >/dev/null && command -v runc >/dev/null || { \
    echo "installed $(CONTAINERD_PACKAGES) but containerd or runc is still missing" >&2; exit 1; }; \
}
endef

# Checked on every run (cheap when present), not only when the venv is rebuilt.
system-deps:
	@$(INSTALL_ETCD)
	@$(INSTALL_CONTAINERD)
	@# DHCP server for the metal network tests (inside their own namespaces); the -base
	@# package has no service to start. Without root those tests skip.
	@command -v dnsmasq >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base; }
	@# tcpdump: the pcap tests compare the filter compiler with its -ddd programs and read
	@# captures back with -r. Without root those comparisons skip.
	@command -v tcpdump >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tcpdump; }
	@# tmux: the dashboard test runs basaltctl dashboard in a detached session and reads
	@# its screen. Without root that test skips.
	@command -v tmux >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tmux; }
	@# graphviz: the inspect dependencies test renders the dot it prints (dot -Tsvg).
	@command -v dot >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz; }
	@# PostgreSQL for the fleet's replica tests: the server binaries only (the tests run
	@# their own clusters with initdb + pg_ctl), no system cluster is started.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends postgresql-common postgresql-15 \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; }
	@# Debian's Chromium for the web UI's browser tests (Playwright drives it; its own
	@# browser download is not used) and a font for its pages and screenshots.
	@{ command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi dejavu; } \
	  || [ "$$(id -u)" != 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }

install: $(STAMP) system-deps

demo: install
	@bash scripts/demo.sh

# ruff, and the import contracts in .importlinter: the layers, no cycles anywhere.
lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/lint-imports --config .importlinter --no-cache

# Every module of src/basalt and the benchmarks, strictly.
typecheck: install
	$(BIN)/mypy --strict -p basalt
	$(BIN)/mypy --strict bench/*.py

# Lanes: `unit` is the fast one (pure tests and the fuzz targets' short budget, under two
# minutes on 2 cores); `integration` starts real processes (etcd, containerd, nodes).
unit: install image-deps
	$(BIN)/pytest -q -m "not vm" tests/unit tests/fuzz $(PYTEST_ARGS)

integration: install image-deps
	$(BIN)/pytest -q -m "not vm" tests/integration $(PYTEST_ARGS)

# The outside-facing parsers under hypothesis, FUZZ_EXAMPLES inputs each (make test runs
# the same targets with a short budget: tests/fuzz/conftest.py).
FUZZ_EXAMPLES ?= 10000
fuzz: install
	BASALT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
	  --hypothesis-show-statistics tests/fuzz $(PYTEST_ARGS)

test: lint typecheck docs-check unit integration vm-smoke

docs: install
	$(BIN)/python -m basalt.machinery.config.reference

docs-check: install
	$(BIN)/python -m basalt.machinery.config.reference --check

bench: install
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/cluster_create.py
	$(BIN)/python bench/api_rtt.py
	$(BIN)/python bench/etcd_cluster.py
	$(BIN)/python bench/upgrade.py
	$(BIN)/python bench/ui.py
	$(BIN)/python bench/factory.py
	$(BIN)/python bench/discovery.py

# Boot: Basalt to its first API answer vs a Debian minimal + systemd + openssh-server
# image to its first SSH banner, same QEMU flags (bench/boot.py). Not part of `make bench`:
# it builds the image and, once, the Debian peer with debootstrap (as root; cached under
# _out/bench), then boots each guest 3 times under TCG: ~5 min or more. Run it on an
# otherwise idle host: other VMs or builds make the figures meaningless.
BENCH_BOOT_ARGS ?=
bench-boot: install image-deps
	@command -v debootstrap >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
	$(BIN)/python -m basalt.imager build
	$(BIN)/python bench/boot.py $(BENCH_BOOT_ARGS)

# Installs only the packages that are missing; apt-get update runs only then.
image-deps:
	@missing=$$(for p in $(IMAGE_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "image builds need: $$missing (apt-get install them as root)" >&2; exit 1; \
	  fi; \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Re-resolve image.lock (Debian packages + wheels pinned to the venv); review and commit it.
image-lock: install
	$(BIN)/python -m basalt.imager lock

# SIGNING_KEY=PREFIX.key (basaltctl gen signing-key) also writes _out/image/bundle.tar.
image: install image-deps
	$(BIN)/python -m basalt.imager build $(if $(SIGNING_KEY),--signing-key $(SIGNING_KEY))

# The single-node VM tests that fit in CI (part of `make test`): build the image, boot it
# into maintenance mode, no shell in the root, install to disk through the insecure API,
# reboot from the disk, answer with mTLS, extra kernel args in the boot entry; a custom
# extension built from source, booted, its service and fixed-path kubelet running; the
# metal-only toolbox verbs (wipe disk, META keys) on an installed node with a second disk.
# About 9 min under TCG after the image build (about 5 min the first time: packages and wheels).
VM_SMOKE := tests/vm/test_boot.py tests/vm/test_install.py tests/vm/test_custom_extensions.py \
            tests/vm/test_wipe.py
vm-smoke: install image-deps
	$(BIN)/pytest -q -m vm $(VM_SMOKE) -k "not second_disk and not config_url"

vm-test: install image-deps
	$(BIN)/pytest -q -s -m "vm and not vm_cuts" tests/vm $(PYTEST_ARGS)

# 20 power cuts of an installed QEMU node during upgrades and applies (20-30 min).
vm-cuts: install image-deps
	$(BIN)/pytest -q -s -m vm_cuts tests/vm/test_power_cuts.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
