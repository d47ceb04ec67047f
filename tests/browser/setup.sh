#!/usr/bin/env bash
# Filled in with the browser tests.
exit 0
