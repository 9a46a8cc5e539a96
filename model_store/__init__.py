"""The shared core: vocabulary, model, checkpoints, generation and scoring.

Both the offline `training` package and the `app` service import from here; this
package imports neither.
"""
