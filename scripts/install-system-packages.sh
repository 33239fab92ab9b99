#!/usr/bin/env bash
# Debian packages the tests use: dciodvfy (dicom3tools) validates every DICOM object we
# write, dcmtk makes compressed test files, Orthanc (+ DICOMweb plugin) is the PACS, chromium
# is the browser Playwright drives for the browser panel's tests (no browser download), cmake
# configures and installs the Slicer extension for its layout test.
set -euo pipefail
packages=(dicom3tools dcmtk orthanc orthanc-dicomweb chromium cmake)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The Debian package starts a system-wide Orthanc where it can; the tests start their own.
$sudo service orthanc stop >/dev/null 2>&1 || true
