#!/usr/bin/env bash
# Installs the system programs the tests use, from Debian's packages, when missing:
#   promtool (prometheus) for deploy config checks, chromium + chromedriver for
#   browser tests (and Japanese fonts for their screenshots), a JDK and Maven
#   for the Apache Kafka broker the tests start.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium chromium-driver)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
# Japanese glyphs for the console screenshots the browser tests save.
[ -e /usr/share/fonts/opentype/ipafont-gothic ] || [ -e /usr/share/fonts/truetype/fonts-japanese-gothic.ttf ] || need+=(fonts-ipafont-gothic)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${need[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: need root (or sudo) to install: ${need[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
