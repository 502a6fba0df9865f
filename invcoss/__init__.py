"""The `invcoss` command and the whole federation on one machine (`invcoss demo`).

This package sits above both sides of the federation: it assembles the `invcoss` command from the method's CLI
(`invcoss_core.cli`) and the demo, which starts a coordinator (`server`) and sites (`site_client`) as processes on
127.0.0.1 (`invcoss.localfed`). Neither `server` nor `site_client` imports it.
"""
