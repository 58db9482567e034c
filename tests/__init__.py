"""tenantedge's test suite (run with C{trial tests})."""
