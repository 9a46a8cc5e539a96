"""Offline training: corpus reading, minibatch sampling, the training loop and the `lyrics` CLI."""
