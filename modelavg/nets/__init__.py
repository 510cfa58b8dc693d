"""The networks: ``dnn`` (the acoustic model and its file), ``rbm`` (one RBM and its CD-1
training), ``dbn`` (the RBM stack, its file, and the DNN it initialises)."""
