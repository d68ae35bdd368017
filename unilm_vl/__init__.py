"""unilm_vl."""
