"""The embedded driver (`anneal run`): a local Ray and MLflow store; it observes locally, calls `anneal.control`, and acts.

`runner` dispatches a manifest by kind (jobs run to the end here, `compression` for
CompressionJobs), `pipeline` runs a ModelPipeline's stages in the order the shared core says,
`service` starts a ModelService's Serve app, `rollout` drives its rollout with the shared tick.
"""
