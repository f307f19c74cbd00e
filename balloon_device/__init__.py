"""virtio-balloon device (id 5) served over vhost-user: free page reporting,
inflate/deflate, stats, page poison, and a discard engine that frees shared
guest memory."""
