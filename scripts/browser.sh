#!/usr/bin/env bash
# The headless browser of the page's end-to-end tests (tests/serving/test_page_browser.py), from
# Debian's packages: Chromium and its WebDriver. The test calls this before it starts the
# browser, so a fresh CI machine gets them; a developer machine uses the same steps.
#
#   scripts/browser.sh install   install chromium + chromium-driver with apt-get (root; skipped
#                                when both are present, FORCE_INSTALL=1 runs apt-get anyway)
#   scripts/browser.sh paths     print the browser's and the driver's paths, one a line
#
# Debian's packages, not a driver library's own download: the test machines reach Debian's
# archive but not the hosts those downloads come from.
set -euo pipefail

log() { printf '[browser %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf '[browser] error: %s\n' "$*" >&2
    exit 1
}

browser_path() { command -v chromium || command -v chromium-browser; }
driver_path() { command -v chromedriver; }

install_browser() {
    if browser_path >/dev/null && driver_path >/dev/null && [[ ${FORCE_INSTALL:-0} != 1 ]]; then
        log "present: $(browser_path), $(driver_path)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "Chromium is not installed; run as root: sudo $0 install"
    command -v apt-get >/dev/null || die "apt-get not found; install chromium and its driver by hand"
    log "installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >/dev/null
    browser_path >/dev/null && driver_path >/dev/null ||
        die "apt-get ran but chromium or chromedriver is still missing"
    log "installed: $(chromium --version 2>/dev/null || true)"
}

case "${1:-}" in
install) install_browser ;;
paths)
    browser_path || die "chromium not found: $0 install"
    driver_path || die "chromedriver not found: $0 install"
    ;;
*) die "usage: $0 install | paths" ;;
esac
