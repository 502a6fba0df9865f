"""The InvCoSS coordinator: Flower SuperLink supervision, the stage-plan ServerApp, enrollment, state, metrics."""
