"""The InvCoSS hospital site: Flower SuperNode supervision, the stage ClientApp, audit log, metrics, keys."""
