"""The shared data layer: sources (TSV, webdataset, frame folders), small picklable stages, the checkpointable
iterator, tokenisers, the synthetic world and the prepare_* converters."""
