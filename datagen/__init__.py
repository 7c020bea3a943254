"""SPMS synthesis and the SPMS filter (stage-2 data) as Ray jobs."""
