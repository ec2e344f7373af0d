"""Small single-purpose helpers shared by the models, the data code and the engine."""
