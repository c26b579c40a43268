// Fused output layer + loss tests (issue 11): placeholder, filled in next.
