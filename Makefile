# The README's two commands: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test test-unit test-integration test-vm lint bench bench-guest deb

setup:
	./scripts/setup

demo: setup
	./scripts/demo

lint: setup
	.venv/bin/ruff check cephvol tests $(wildcard bench)

test: setup lint
	.venv/bin/pytest -q

test-unit: setup
	.venv/bin/pytest -q -m "not integration and not vm"

test-integration: setup
	.venv/bin/pytest -q -m integration

test-vm: setup
	.venv/bin/pytest -q -m vm

bench: setup
	.venv/bin/python -m bench

# krbd attach/detach in the qemu test host vs `rbd map` + mount (a few minutes under TCG)
bench-guest: setup
	.venv/bin/python -m bench.guest

# Debian package, built by Debian's tools (debian/) in a copy of what the package
# is made of, so the tree stays clean: dist/cephvol_<version>_all.deb, lintian-checked
DEB_VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' cephvol/__init__.py)
deb:
	./scripts/setup-deb
	rm -rf build/deb && mkdir -p build/deb/cephvol-$(DEB_VERSION) dist
	cp -r pyproject.toml README.md CHANGELOG.md cephvol debian build/deb/cephvol-$(DEB_VERSION)/
	find build/deb -name __pycache__ -prune -exec rm -rf {} +
	# Debian's python3, not whatever python3 comes first on PATH (pyenv, a venv)
	cd build/deb/cephvol-$(DEB_VERSION) && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc >../build.log 2>&1 \
	    || { tail -40 ../build.log; exit 1; }
	lintian --fail-on error,warning --info build/deb/cephvol_$(DEB_VERSION)_amd64.changes
	rm -f dist/cephvol_*_all.deb
	cp build/deb/cephvol_$(DEB_VERSION)_all.deb dist/
	@echo "deb: dist/cephvol_$(DEB_VERSION)_all.deb"
