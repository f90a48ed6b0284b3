"""The pool and the sets: the pool protocol, the sources (in memory and shards), image decoding, downloads, the run's inputs, how a training set is held."""
