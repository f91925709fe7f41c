#!/usr/bin/env bash
# The headless browsers of the page's end-to-end tests (tests/serving/test_page_browser.py),
# from Debian's packages: Chromium with its WebDriver (chromium-driver), and Firefox ESR, which
# the tests drive over WebDriver BiDi (Debian packages no geckodriver). The test calls this
# before it starts a browser, so a fresh CI machine gets them; a developer machine uses the
# same steps.
#
#   scripts/browser.sh install   install chromium, chromium-driver and firefox-esr with apt-get
#                                (root; skipped when all are present, FORCE_INSTALL=1 runs
#                                apt-get anyway)
#   scripts/browser.sh paths     print chromium's, chromedriver's and firefox's paths, one a line
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
firefox_path() { command -v firefox-esr || command -v firefox; }

install_browser() {
    if browser_path >/dev/null && driver_path >/dev/null && firefox_path >/dev/null &&
        [[ ${FORCE_INSTALL:-0} != 1 ]]; then
        log "present: $(browser_path), $(driver_path), $(firefox_path)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "the browsers are not installed; run as root: sudo $0 install"
    command -v apt-get >/dev/null || die "apt-get not found; install chromium, its driver and firefox by hand"
    log "installing chromium, chromium-driver and firefox-esr with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver firefox-esr fonts-dejavu-core >/dev/null
    browser_path >/dev/null && driver_path >/dev/null && firefox_path >/dev/null ||
        die "apt-get ran but chromium, chromedriver or firefox is still missing"
    log "installed: $(chromium --version 2>/dev/null || true); $(firefox_path)"
}

case "${1:-}" in
install) install_browser ;;
paths)
    browser_path || die "chromium not found: $0 install"
    driver_path || die "chromedriver not found: $0 install"
    firefox_path || die "firefox not found: $0 install"
    ;;
*) die "usage: $0 install | paths" ;;
esac
