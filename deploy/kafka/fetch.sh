#!/usr/bin/env bash
# Fetch the Apache Kafka broker jars pinned in deploy/kafka/pom.xml into a flat
# directory usable as `java -cp 'DIR/*'`.
#
#   deploy/kafka/fetch.sh [DIR]
#
# DIR defaults to $LEAKWATCH_KAFKA_LIBS, else <repo root>/.cache/kafka-libs.
# Idempotent: when DIR/.kafka-version already names the pinned version nothing
# is downloaded. Works from a fresh clone with an empty ~/.m2 (needs mvn + Java
# and access to Maven Central). Prints the libs directory on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
pom="$here/pom.xml"

dir="${1:-${LEAKWATCH_KAFKA_LIBS:-$repo_root/.cache/kafka-libs}}"
mkdir -p "$(dirname "$dir")"
dir="$(cd "$(dirname "$dir")" && pwd)/$(basename "$dir")"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)"
if [[ -z "$version" ]]; then
    echo "fetch.sh: could not read <kafka.version> from $pom" >&2
    exit 1
fi
marker="$dir/.kafka-version"

is_fetched() {
    [[ -f "$marker" && "$(cat "$marker")" == "$version" && -f "$dir/kafka_2.13-$version.jar" ]]
}

if is_fetched; then
    echo "$dir"
    exit 0
fi

# Serialise concurrent fetches (parallel test runs, demo + tests) on a lock file.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${dir}.lock"
    flock 9
    if is_fetched; then
        echo "$dir"
        exit 0
    fi
fi

if ! command -v mvn >/dev/null 2>&1; then
    echo "fetch.sh: mvn not found on PATH (install Maven 3.8+ and a Java 17+ JDK)" >&2
    exit 1
fi

# Download into a sibling staging dir, then swap it in, so an interrupted fetch
# never leaves a half-populated DIR carrying a valid marker.
staging="$(mktemp -d "${dir}.tmp.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

echo "fetch.sh: fetching Apache Kafka $version jars into $dir" >&2
mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
    -DoutputDirectory="$staging" -DincludeScope=runtime >&2

if [[ ! -f "$staging/kafka_2.13-$version.jar" ]]; then
    echo "fetch.sh: kafka_2.13-$version.jar missing after mvn run" >&2
    exit 1
fi
printf '%s\n' "$version" >"$staging/.kafka-version"

rm -rf "$dir"
mv "$staging" "$dir"
trap - EXIT
echo "$dir"
