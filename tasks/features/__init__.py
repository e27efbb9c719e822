"""ResNet50 features: the model (build, weights, GPU memory, compiled forward pass), the
Parquet feature store, and the embed stage that joins them."""
