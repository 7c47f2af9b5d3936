//! DNS authority for hosted zone domains (hickory-server) and zone-config bootstrap over DNS.
